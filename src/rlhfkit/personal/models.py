"""One base model in memory, one LoRA adapter per user (peft multi-adapter), switched per request.

An *owner* is ``user-ID`` (a user's adapter) or ``population`` (an adapter trained on everyone's pairs).
Each owner's versions live on disk as ``FOLDER/OWNER/vN/`` (``adapter_config.json``,
``adapter_model.safetensors``, ``version.json``); a version is written to a hidden partial folder and
renamed into place, so a folder named ``vN`` is always whole. In memory the adapter of OWNER's version
N is named ``OWNER-vN``; it replaces the previous one only once it is saved.

The starting point of a user's adapter is the population adapter's weights when there is one, else a
fresh LoRA (B = 0, so W + BA = W: exactly the base model). The model's active adapter is global state:
every forward pass (an answer, a training step) sets the adapter it needs under ``lock``.

Several processes may share the folder (``personal serve`` and ``personal train``): one training of an owner
at a time across all of them (a lock file ``FOLDER/.locks/OWNER.lock``), and a process answers from the
latest version on disk, whoever published it (read again at every answer). Publishing and removing versions
hold ``FOLDER/.locks/versions.lock`` for the moment they take.

Deletion: a user's deletion removes their versions, every population version trained on their pairs (its
``version.json`` lists the ``users`` whose pairs it was trained on; one without that list, or with one that is
not a list of ids, may hold anyone's),
and every user's version that started from one of those (its weights began as the population's). A removed
version leaves ``vN.removed`` (why, no weights), so that its number is not given again and the owner's page
says what happened; a training whose starting point is removed meanwhile (or its number given again after a hand-deleted
note: versions on disk are told apart by their weights file's inode and time) is refused at publish
(``StartRemoved``) and trained again.

Memory: an adapter of rank r on a linear layer d_in → d_out holds r·(d_in + d_out) weights; the
model's ``adapter_megabytes`` measures the real total of one adapter. At most ``max_in_memory`` users'
adapters stay loaded; the least recently used is dropped and read again from its folder when needed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import torch
from filelock import FileLock
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhfkit.generate import cut_at_limit, format_prompt
from rlhfkit.models.engine import Decoding, sample_completions
from rlhfkit.models.policy import check_prompt_lengths, prepare_tokenizer
from rlhfkit.rl.trainer import partial_folder

POPULATION = "population"
FRESH = "fresh"  # the never-trained adapter that keeps the peft wrapper's set of adapters non-empty
VERSION_FOLDER = re.compile(r"v(\d+)")
USER_FOLDER = re.compile(r"user-(\d+)")
NUMBERED = re.compile(r"v(\d+)(?:\.removed)?")  # a version, or the note a removed one left: numbers given once
REMOVED_NOTE = re.compile(r"v(\d+)\.removed")
LOCKS = ".locks"
RECORDED = {  # version.json's fields a deletion and the page rely on, as publish writes them
    "users": lambda value: isinstance(value, list) and all(type(u) is int for u in value),  # user ids
    "start": lambda value: isinstance(value, str),  # "base" or an adapter name
    "pairs": lambda value: type(value) is int,
}
DELETED_USERS_PAIRS = "trained on the pairs of a user who deleted their data"


class Answer(NamedTuple):
    """A sampled answer, as decoded, and whether it was cut at max_new_tokens before EOS (the start of an
    answer: trained without EOS)."""

    text: str
    truncated: bool


class PromptTooLong(ValueError):
    """A prompt that leaves no room for the answer within the model's positions."""


class StartRemoved(RuntimeError):
    """A version whose starting point was removed while it trained (a user's deletion): not published."""


class Forgotten(NamedTuple):
    """What a user's deletion removed besides their own adapters: the population versions trained on their
    pairs, and the other users' versions that started from one of those (user id → version numbers)."""

    population: list[int]
    started_from_them: dict[int, list[int]]


def user_owner(user_id: int) -> str:
    return f"user-{int(user_id)}"  # an int: never a path from a user's input


class PersonalModels:
    """The base policy wrapped once with peft, and the latest version of each owner's adapter, loaded
    from ``folder`` on first use."""

    def __init__(self, policy: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: str | os.PathLike,
                 lora_r: int = 8, lora_alpha: int = 16, use_chat_template: bool = False,
                 max_in_memory: int = 1000) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.lora = LoraConfig(task_type="CAUSAL_LM", r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0,
                               target_modules="all-linear")
        with warnings.catch_warnings():  # peft's note that GPT-2's Conv1D layers get fan_in_fan_out=True
            warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False")
            self.model = get_peft_model(policy.eval(), self.lora, adapter_name=FRESH)
        self.tokenizer = prepare_tokenizer(tokenizer, policy)
        self.use_chat_template = use_chat_template
        self.lock = threading.RLock()  # the active adapter and every forward pass
        self._owner_locks: dict[str, FileLock] = {}
        self._versions_lock = FileLock(self.folder / LOCKS / "versions.lock")
        try:  # now, not at the first deletion (its choices removed, then its adapters kept) or training
            with self._versions_lock.acquire(timeout=60):  # held for a moment by a publish or removal elsewhere
                pass
        except OSError as exc:
            raise OSError(f"{self.folder / LOCKS}: cannot make lock files there ({exc.strerror or exc}): the "
                          f"adapters folder must be writable") from None
        # owner → the version in memory (number, weights file's inode and mtime), least recently used first
        self._loaded: OrderedDict[str, tuple[int, int, int]] = OrderedDict()
        self.max_in_memory = max_in_memory  # users' adapters kept loaded; the least recently used is dropped

    # ------------------------------------------------------------ versions on disk
    def versions(self, owner: str) -> list[int]:
        """OWNER's saved versions, oldest first (partial folders are not versions)."""
        folder = self.folder / owner
        found = [VERSION_FOLDER.fullmatch(p.name) for p in folder.iterdir()] if folder.is_dir() else []
        return sorted(int(m.group(1)) for m in found if m)

    def version(self, owner: str) -> int:
        """OWNER's latest version, 0 when it has none."""
        return (self.versions(owner) or [0])[-1]

    def _next_version(self, owner: str) -> int:
        """One past every number OWNER's versions had, removed ones included."""
        folder = self.folder / owner
        found = [NUMBERED.fullmatch(p.name) for p in folder.iterdir()] if folder.is_dir() else []
        return max([0] + [int(m.group(1)) for m in found if m]) + 1

    def removed_versions(self, owner: str) -> list[dict]:
        """OWNER's removed versions, oldest first: ``{"version": N, "removed": why}`` (why unknown when the
        note was hand-edited)."""
        folder = self.folder / owner
        found = [REMOVED_NOTE.fullmatch(p.name) for p in folder.iterdir()] if folder.is_dir() else []
        removed = []
        for version in sorted(int(m.group(1)) for m in found if m):
            try:
                why = json.loads((folder / f"v{version}.removed").read_text())["removed"]
            except (OSError, ValueError, TypeError, KeyError):
                why = f"unknown (its note v{version}.removed is not readable)"
            removed.append({"version": version, "removed": why})
        return removed

    def version_info(self, owner: str, version: int) -> dict:
        """OWNER's ``vN/version.json``; a ValueError naming the file when it is not a JSON object (hand-edited)."""
        path = self.folder / owner / f"v{version}" / "version.json"
        try:
            info = json.loads(path.read_text())
        except ValueError as exc:
            raise ValueError(f"{path}: not JSON ({exc})") from None
        if not isinstance(info, dict):
            raise ValueError(f"{path}: not a JSON object")
        return info

    def version_infos(self, owner: str) -> list[dict]:
        """OWNER's saved versions' ``version.json``, oldest first; one deleted since it was listed (the owner's
        data deleted meanwhile) is left out, one hand-edited out of shape is ``{"version": N, "unreadable": why}``."""
        infos = []
        for version in self.versions(owner):
            try:
                infos.append(self.version_info(owner, version))
            except FileNotFoundError:
                continue
            except ValueError as exc:
                infos.append({"version": version, "unreadable": str(exc)})
        return infos

    def trained_pairs(self, owner: str) -> int:
        """The pairs OWNER's latest version was trained on; 0 when it has none or its count is unreadable."""
        version = self.version(owner)
        return self._recorded(owner, version, "pairs", 0) if version else 0

    # ------------------------------------------------------------ adapters in memory
    def adapter(self, owner: str) -> str | None:
        """The in-memory adapter of OWNER's latest version (loaded now if need be); None when it has none."""
        with self.lock:
            version = self.version(owner)
            if version == 0:
                return None
            if self._loaded.get(owner) != self._on_disk(owner, version):
                self._load(owner, version)
            self._loaded.move_to_end(owner)
            return f"{owner}-v{version}"

    def _on_disk(self, owner: str, version: int) -> tuple[int, int, int]:
        """What tells OWNER's version on disk from an earlier one of the same number (given again after the
        owner's deletion, or after a hand-deleted ``vN.removed``, by whichever process): (number, the weights
        file's inode, its modification time in ns); (number, 0, 0) when it was removed meanwhile."""
        try:
            weights = (self.folder / owner / f"v{version}" / "adapter_model.safetensors").stat()
        except FileNotFoundError:
            return version, 0, 0
        return version, weights.st_ino, weights.st_mtime_ns

    def _load(self, owner: str, version: int) -> None:
        name, path = f"{owner}-v{version}", self.folder / owner / f"v{version}"
        self._drop(owner)  # its name may be this one's: an earlier version of the same number
        self.model.add_adapter(name, LoraConfig.from_pretrained(path))
        set_peft_model_state_dict(self.model, load_file(path / "adapter_model.safetensors"), adapter_name=name)
        self._keep(owner, version)

    def _keep(self, owner: str, version: int) -> None:
        """OWNER's adapter in memory is now ``version`` (the previous one dropped), the most recently used;
        past ``max_in_memory`` users, the least recently used is dropped (reloaded from disk when next used)."""
        if self._loaded.get(owner, (0,))[0] != version:
            self._drop(owner)
        self._loaded.pop(owner, None)
        self._loaded[owner] = self._on_disk(owner, version)
        users = [o for o in self._loaded if o != POPULATION]
        for least_used in users[:max(0, len(users) - self.max_in_memory)]:
            self._drop(least_used)

    def _drop(self, owner: str) -> None:
        if owner in self._loaded:
            self.delete_adapter(f"{owner}-v{self._loaded.pop(owner)[0]}")

    def delete_adapter(self, name: str) -> None:
        with self.lock:
            if name in self.model.peft_config:
                self.model.set_adapter(FRESH)  # peft moves off a deleted active adapter with a warning
                self.model.delete_adapter(name)

    def new_adapter(self, name: str, start: str | None) -> str:
        """A trainable adapter ``name`` holding the weights of adapter ``start`` (its rank and targets too: it
        may have been trained with another ``lora_r``), or a fresh LoRA of this process's when None (exactly
        the base model)."""
        with self.lock:
            self.delete_adapter(name)  # a leftover of a failed training
            config = self.lora if start is None else replace(self.model.peft_config[start], inference_mode=False)
            self.model.add_adapter(name, config)
            if start is not None:
                set_peft_model_state_dict(self.model, get_peft_model_state_dict(self.model, adapter_name=start),
                                          adapter_name=name)
            return name

    def starting_point(self, owner: str) -> str | None:
        """The adapter OWNER's versions start from (and DPO's reference): for a user the population's, for
        the population (and a user when there is none) None, the base model."""
        return None if owner == POPULATION else self.adapter(POPULATION)

    @contextmanager
    def active(self, adapter: str | None) -> Iterator[None]:
        """Hold the lock with ``adapter`` active (None: the base model, every adapter disabled)."""
        with self.lock:
            if adapter is None:
                with self.model.disable_adapter():
                    yield
            else:
                self.model.set_adapter(adapter)
                yield

    def adapter_megabytes(self, name: str) -> float:
        """Memory held by one adapter's weights, in MiB."""
        return sum(p.numel() * p.element_size() for n, p in self.model.named_parameters()
                   if f".{name}." in n) / 2**20

    # ------------------------------------------------------------ saving and forgetting
    @contextmanager
    def training_of(self, owner: str) -> Iterator[None]:
        """One training of OWNER at a time, among this process's threads and every process using the folder
        (re-entrant in one thread); ``forget`` waits for it."""
        with self.lock:
            owner_lock = self._owner_locks.setdefault(owner, FileLock(self.folder / LOCKS / f"{owner}.lock"))
        with owner_lock:
            yield

    def next_adapter(self, owner: str) -> str:
        """The name OWNER's next version is trained under (in memory, not served until ``publish``)."""
        return f"{owner}-v{self._next_version(owner)}"

    def publish(self, owner: str, trained: str, info: dict, start_saved: tuple[int, int, int] | None) -> int:
        """Save adapter ``trained`` (named by ``next_adapter``) as OWNER's next version — a partial folder,
        then renamed, so it is whole or absent — and serve it from now on; returns the version. Refused
        (``StartRemoved``) when ``info["start"]``, the adapter it started from, is no longer the version on
        disk ``start_saved`` (``saved_as`` when the training began) was: removed meanwhile, or its number given
        again after a hand-deleted ``vN.removed``."""
        with self._versions_lock:
            version = self._next_version(owner)
            if trained != f"{owner}-v{version}":
                raise ValueError(f"{trained}: not {owner}'s next version (v{version})")
            start = info.get("start", "base")
            if start != "base" and self.saved_as(start) != start_saved:
                raise StartRemoved(f"{trained}: its starting point {start} was removed while it trained "
                                   f"({DELETED_USERS_PAIRS})")
            final = self.folder / owner / f"v{version}"
            partial = partial_folder(final)
            shutil.rmtree(partial, ignore_errors=True)  # left by a crash mid-write
            partial.mkdir(parents=True)
            with self.lock:
                state = {k: v.detach().contiguous() for k, v in
                         get_peft_model_state_dict(self.model, adapter_name=trained).items()}
                save_file(state, partial / "adapter_model.safetensors")
            self.model.peft_config[trained].save_pretrained(partial)
            (partial / "version.json").write_text(json.dumps({"version": version, **info}, indent=1))
            os.replace(partial, final)
        with self.lock:
            self._keep(owner, version)
        return version

    def saved_as(self, adapter: str | None) -> tuple[int, int, int] | None:
        """Which version on disk an adapter name ``OWNER-vN`` stands for now (``_on_disk``); None: the base."""
        if adapter is None:
            return None
        owner, version = adapter.rsplit("-v", 1)
        return self._on_disk(owner, int(version))

    def forget(self, user_id: int) -> Forgotten:
        """Every adapter of the user, on disk and in memory, gone (a training of theirs finishes first), and
        every adapter trained on their pairs (a population training running now finishes first): the
        population versions whose ``users`` include them or are not recorded, and every user's version that
        started from one of those. A ``version.json`` missing, not JSON or hand-edited (``users`` not a list of
        ids, ``start`` not a name) is unknown: such a population version may hold anyone's pairs, such a user's
        version may have started from any removed one; both go. The caller trains those owners again (their
        pairs remain)."""
        owner = user_owner(user_id)
        with self.training_of(owner), self.training_of(POPULATION), self._versions_lock, self.lock:
            self._drop(owner)
            for name in [n for n in self.model.peft_config if n.startswith(f"{owner}-")]:
                self.delete_adapter(name)
            if (self.folder / owner).exists():
                shutil.rmtree(self.folder / owner)  # an error here is loud: the user was told "deleted"
            (self.folder / LOCKS / f"{owner}.lock").unlink(missing_ok=True)  # held: a waiter takes a new one
            population = [v for v in self.versions(POPULATION)
                          if user_id in self._recorded(POPULATION, v, "users", [user_id])]
            for version in population:
                self._remove_version(POPULATION, version, DELETED_USERS_PAIRS)
            removed = {f"{POPULATION}-v{v}" for v in population}
            started_from_them: dict[int, list[int]] = {}
            for other in sorted(int(m.group(1)) for p in self.folder.iterdir() if (m := USER_FOLDER.fullmatch(p.name))):
                for version in self.versions(user_owner(other)):
                    start = self._recorded(user_owner(other), version, "start", None)
                    if start in removed or (start is None and removed):
                        self._remove_version(user_owner(other), version, f"started from {start}, {DELETED_USERS_PAIRS}")
                        started_from_them.setdefault(other, []).append(version)
        return Forgotten(population, started_from_them)

    def _recorded(self, owner: str, version: int, field: str, unknown: object) -> object:
        """``field`` of OWNER's version.json as ``publish`` writes it (``RECORDED``); ``unknown`` when the file
        is missing or not JSON, or the field is absent or hand-edited out of shape."""
        try:
            value = self.version_info(owner, version).get(field)
        except (OSError, ValueError):
            return unknown
        return value if RECORDED[field](value) else unknown

    def _remove_version(self, owner: str, version: int, why: str) -> None:
        """OWNER's version gone from memory and disk, leaving the note ``vN.removed`` (why)."""
        if self._loaded.get(owner, (0,))[0] == version:
            self._drop(owner)
        self.delete_adapter(f"{owner}-v{version}")
        shutil.rmtree(self.folder / owner / f"v{version}")
        (self.folder / owner / f"v{version}.removed").write_text(json.dumps({"version": version, "removed": why}))

    def adapter_names(self) -> list[str]:
        return list(self.model.peft_config)

    # ------------------------------------------------------------ answers
    @torch.inference_mode()
    def answer(self, prompt: str, adapter: str | None, temperature: float = 1.0, max_new_tokens: int = 48,
               seed: int | None = None) -> Answer:
        """One sampled answer of ``adapter`` (None: the base model), as decoded (not trimmed: DPO later
        reads the same text), and whether it was cut at ``max_new_tokens``; ``seed`` fixes the random draws
        (None: the global generator's)."""
        text = format_prompt(prompt, self.tokenizer, self.use_chat_template)
        encoded = self.tokenizer([text], return_tensors="pt", add_special_tokens=not self.use_chat_template)
        try:
            check_prompt_lengths(self.model, encoded["attention_mask"], [prompt], max_new_tokens)
        except ValueError as exc:
            raise PromptTooLong(str(exc)) from None
        decoding = Decoding(max_new_tokens, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id,
                            temperature=temperature)
        device = next(self.model.parameters()).device
        generator = None if seed is None else torch.Generator(device).manual_seed(seed)
        with self.active(adapter):
            tokens = sample_completions(self.model, encoded["input_ids"].to(device),
                                        encoded["attention_mask"].to(device), 1, decoding, generator)
        return Answer(self.tokenizer.decode(tokens[0], skip_special_tokens=True),
                      cut_at_limit(tokens, self.tokenizer.eos_token_id)[0])
