"""Rewards: the `RewardFn` contract, Bradley-Terry reward models, classifiers and functions as rewards."""

from rlhfkit.reward.base import FunctionReward, RewardFn
from rlhfkit.reward.classifier import ClassifierReward
from rlhfkit.reward.model import RewardModel, RewardModelConfig, bradley_terry_loss, train_reward_model

__all__ = [
    "ClassifierReward",
    "FunctionReward",
    "RewardFn",
    "RewardModel",
    "RewardModelConfig",
    "bradley_terry_loss",
    "train_reward_model",
]
