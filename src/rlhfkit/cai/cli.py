"""`rlhfkit cai revise | sft | label | rlaif`: Constitutional AI from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rlhfkit.console import console, friendly_errors

cai_app = typer.Typer(help="Constitutional AI: critique → revision → SFT, then RLAIF (AI feedback → reward "
                           "model → PPO).", no_args_is_help=True)

ConstitutionOption = Annotated[Path | None, typer.Option(
    help="Constitution YAML (principles, examples, templates) [default: rlhfkit's own].")]
DryRunOption = Annotated[bool, typer.Option(help="Print the exact strings that would go into the model, and stop.")]
ChatOption = Annotated[bool | None, typer.Option(
    help="Apply the tokenizer's chat template (default: when it has one and the model is causal).")]
PrecisionOption = Annotated[str | None, typer.Option(
    help="auto (bf16 autocast where the CPU has AMX-BF16/AVX512-BF16 or the GPU bf16; else fp32), bf16 or fp32 "
         "[default: auto].")]


def _show(strings: dict[str, str]) -> None:
    for title, text in strings.items():
        console.rule(f"[bold]{title}")
        console.print(text, markup=False, highlight=False)


@cai_app.command()
@friendly_errors
def revise(
    model: Annotated[str, typer.Option(help="The model that answers, critiques and revises (folder or hub id).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Revisions JSONL (appended to; rerun resumes).")
                      ] = Path("runs/cai/revisions.jsonl"),
    prompts: Annotated[Path | None, typer.Option(help="Red-team prompts, JSONL or .txt [default: rlhfkit's own].")
                       ] = None,
    constitution: ConstitutionOption = None,
    rounds: Annotated[int, typer.Option(help="Critique → revision rounds, each under a freshly drawn principle.")] = 1,
    max_new_tokens: int = 128,
    temperature: float = 0.7,
    top_p: float = 0.95,
    batch_size: int = 8,
    seed: int = 0,
    gguf_file: str | None = None,
    chat_template: ChatOption = None,
    dry_run: DryRunOption = False,
) -> None:
    """Stage 1: initial answers to red-team prompts, critiqued and revised under the constitution's
    principles; every step is kept in the output."""
    from rlhfkit.cai import critique
    from rlhfkit.cai.constitution import load_constitution
    from rlhfkit.cai.rlaif import default_red_team_prompts
    from rlhfkit.data.io import read_prompts
    from rlhfkit.data.records import SamplingParams, render_text
    from rlhfkit.models.policy import load_policy

    rules = load_constitution(constitution)
    red_team = read_prompts(prompts or default_red_team_prompts())
    policy, tokenizer = load_policy(model, gguf_file=gguf_file)
    chat = critique.uses_chat_template(tokenizer, policy, chat_template)
    if dry_run:
        _show(critique.revision_dry_run(rules, render_text(red_team[0].text), tokenizer, chat))
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    sampling = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)
    critique.revise(policy, tokenizer, red_team, rules, rounds, sampling, batch_size, chat, output, model_name=model)
    console.print(f"revisions → {output}")


@cai_app.command()
@friendly_errors
def sft(
    model: Annotated[str, typer.Option(help="The model to fine-tune (folder or hub id).")],
    revisions: Annotated[Path, typer.Option(help="Revisions JSONL from `rlhfkit cai revise`.")],
    output_dir: Annotated[Path, typer.Option(help="Where the fine-tuned model goes.")] = Path("runs/cai/sft"),
    helpful: Annotated[Path | None, typer.Option(
        help="Preference pairs JSONL whose chosen answers are mixed in as helpful examples.")] = None,
    helpful_fraction: Annotated[float, typer.Option(help="Helpful examples per revision example.")] = 0.5,
    epochs: int = 2,
    lr: float = 5e-5,
    batch_size: int = 8,
    lora: bool = False,
    seed: int = 0,
    gguf_file: str | None = None,
    chat_template: ChatOption = None,
    precision: PrecisionOption = None,
    dry_run: DryRunOption = False,
) -> None:
    """Stage 1: supervised fine-tuning on (prompt, final revision), optionally mixed with helpful answers."""
    import torch
    from accelerate import Accelerator

    from rlhfkit.cai.sft import SFTConfig, SFTExample, train_sft
    from rlhfkit.data.io import read_records
    from rlhfkit.data.records import PreferencePair, Revision
    from rlhfkit.generate import format_prompt, uses_chat_template
    from rlhfkit.models.policy import load_policy

    examples = [SFTExample(r.prompt, r.final, r.final_truncated) for r in read_records(revisions, Revision) if r.final]
    extra = [(p.prompt, p.chosen) for p in read_records(helpful, PreferencePair)] if helpful else []
    extra = [(x, y) for x, y in extra if isinstance(y, str)]
    config = SFTConfig(epochs=epochs, lr=lr, batch_size=batch_size, lora=lora, seed=seed,
                       use_chat_template=chat_template, helpful_fraction=helpful_fraction if helpful else 0.0,
                       output_dir=str(output_dir), **({"precision": precision} if precision else {}))
    policy, tokenizer = load_policy(model, gguf_file=gguf_file)
    if dry_run:
        chat = uses_chat_template(tokenizer, policy, chat_template)
        first = examples[0]
        _show({"model input (prompt)": format_prompt(first.prompt, tokenizer, chat),
               f"target (loss on these tokens{'; cut at the limit: no EOS' if first.truncated else ', then EOS'})":
               first.response})
        return
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    _, metrics = train_sft(policy, tokenizer, examples, config, helpful=extra, output_dir=output_dir,
                           accelerator=accelerator)
    if accelerator.is_main_process:
        console.print(f"{metrics['examples']} revisions + {metrics['helpful_examples']} helpful examples; loss on "
                      f"the revisions {metrics['loss_before']:.3f} → {metrics['loss_after']:.3f}; model → {output_dir}")


@cai_app.command()
@friendly_errors
def label(
    model: Annotated[str, typer.Option(help="The feedback model (folder or hub id).")],
    completions: Annotated[Path, typer.Option(help="Completions JSONL with 2+ responses per prompt.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Soft-labelled pairs JSONL (rerun resumes).")
                      ] = Path("runs/cai/ai_pairs.jsonl"),
    constitution: ConstitutionOption = None,
    chain_of_thought: Annotated[bool, typer.Option(help="Let the model reason first; probabilities are clamped "
                                                        "to 0.4–0.6.")] = False,
    batch_size: int = 8,
    seed: int = 0,
    gguf_file: str | None = None,
    chat_template: ChatOption = None,
    dry_run: DryRunOption = False,
) -> None:
    """Stage 2: compare every two responses to a prompt under a random principle, in both orders; the
    normalised answer probabilities are the soft preference label."""
    from rlhfkit.cai.constitution import load_constitution
    from rlhfkit.cai.feedback import FeedbackConfig, ModelOptionScorer, comparison_dry_run, label_pairs
    from rlhfkit.data.io import read_records
    from rlhfkit.data.records import Completion, render_text
    from rlhfkit.generate import uses_chat_template
    from rlhfkit.models.policy import load_policy

    rules = load_constitution(constitution)
    responses = read_records(completions, Completion)
    feedback, tokenizer = load_policy(model, gguf_file=gguf_file)
    chat = uses_chat_template(tokenizer, feedback, chat_template)
    if dry_run:
        first, second = responses[0], next(c for c in responses[1:] if c.prompt_id == responses[0].prompt_id)
        _show(comparison_dry_run(rules, render_text(first.prompt), first.text, second.text, tokenizer, chat,
                              chain_of_thought))
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    config = FeedbackConfig(chain_of_thought=chain_of_thought, batch_size=batch_size, use_chat_template=chat,
                            seed=seed)
    pairs = label_pairs(responses, rules, ModelOptionScorer(feedback, tokenizer, rules.templates.options), config,
                        feedback, tokenizer, output, feedback_model=model)
    console.print(f"{len(pairs)} new soft-labelled pairs → {output}")


@cai_app.command()
@friendly_errors
def rlaif(
    config: Annotated[Path | None, typer.Option(help="YAML with RLAIFConfig fields; flags override it.")] = None,
    policy: Annotated[str | None, typer.Option(help="The model to align (e.g. the SFT model).")] = None,
    feedback_model: Annotated[str | None, typer.Option(help="The comparing model [default: the policy].")] = None,
    prompts: Annotated[str | None, typer.Option(help="Red-team prompts [default: rlhfkit's own].")] = None,
    constitution: Annotated[str | None, typer.Option(help="Constitution YAML [default: rlhfkit's own].")] = None,
    ppo_steps: int | None = None,
    output_dir: Annotated[str | None, typer.Option(help="Run folder (rerun resumes).")] = None,
    dry_run: DryRunOption = False,
) -> None:
    """Stage 2 end to end: responses → AI feedback (soft labels) → reward model → PPO."""
    from rlhfkit.cai.constitution import load_constitution
    from rlhfkit.cai.feedback import comparison_dry_run
    from rlhfkit.cai.rlaif import RLAIFConfig, default_red_team_prompts, run_rlaif
    from rlhfkit.config import config_from_mapping, read_yaml
    from rlhfkit.data.io import read_prompts
    from rlhfkit.data.records import render_text

    fields = read_yaml(config) if config else {}
    fields |= {k: v for k, v in {"policy": policy, "feedback_model": feedback_model, "prompts": prompts,
                                 "constitution": constitution, "ppo_steps": ppo_steps,
                                 "output_dir": output_dir}.items() if v is not None}
    settings = config_from_mapping(RLAIFConfig, fields, str(config or "flags"))
    if dry_run:
        from rlhfkit.generate import uses_chat_template
        from rlhfkit.models.policy import load_policy

        rules = load_constitution(settings.constitution)
        prompt = render_text(read_prompts(settings.prompts or default_red_team_prompts())[0].text)
        judge = settings.feedback_model or settings.policy
        model, tokenizer = load_policy(judge) if judge else (None, None)
        chat = model is not None and uses_chat_template(tokenizer, model, None)
        _show(comparison_dry_run(rules, prompt, "<response 1 from the policy>", "<response 2 from the policy>",
                                 tokenizer, chat, settings.chain_of_thought))
        return
    run_rlaif(settings)
