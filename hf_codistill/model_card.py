"""The codistillation section of each group's model card: how the model was trained, with whom, and how it scored.

Trainer writes the card's metadata and training summary; this adds what a reader needs to reproduce or compare a
codistilled model: G, k, alpha, the loss and temperature, the peer models, the data, its own and the ensemble's
evaluation metrics.
"""

from __future__ import annotations

SECTION_TITLE = "## Codistillation"


def peer_names(own_name: str, group_index: int, peer_groups: list[int]) -> list[str]:
    """The peer groups' repositories (`<base>-group-<j>`) or folders (`group_<j>`), from this group's name."""
    suffix = f"-group-{group_index}"
    if own_name.endswith(suffix):
        base = own_name[: -len(suffix)]
        return [f"{base}-group-{j}" for j in peer_groups]
    return [f"group_{j}" for j in peer_groups]


def group_log_history(log_history: list[dict], group: int) -> list[dict]:
    """One process's shared log history as model `group`'s own: its `group_<g>/` values under the plain keys (which
    hold model 0's), the other models' prefixed values dropped, the shared ones (ensemble, agreement) kept."""
    prefix = f"group_{group}/"
    return [
        {**{key: value for key, value in entry.items() if not key.startswith("group_")},
         **{key[len(prefix):]: value for key, value in entry.items() if key.startswith(prefix)}}
        for entry in log_history
    ]


def last_eval_metrics(log_history: list[dict]) -> dict[str, float]:
    """This group's metrics from the latest evaluation in the log history (not the other groups' copies)."""
    for entry in reversed(log_history):
        if any(key.startswith("eval_") for key in entry):
            return {key: value for key, value in entry.items() if key.startswith("eval_") and "runtime" not in key
                    and "per_second" not in key}
    return {}


def with_codistillation_tag(tags) -> list[str]:
    tags = [tags] if isinstance(tags, str) else list(tags or [])
    return tags + (["codistillation"] if "codistillation" not in tags else [])


def codistillation_section(args, group_index: int, num_groups: int, group_size: int, peers: list[str],
                           dataset: str | list[str] | None, eval_metrics: dict[str, float],
                           base_model: str | None = None) -> str:
    own = {key: value for key, value in eval_metrics.items() if "ensemble" not in key and "agreement" not in key}
    shared = {key: value for key, value in eval_metrics.items() if key not in own}
    lines = [
        SECTION_TITLE,
        "",
        f"This is model {group_index} of {num_groups} trained together by codistillation (Anil et al., 2018; "
        "Sodhani et al., 2021) with hf_codistill: each model was "
        f"trained with data parallelism over its own group of {group_size} process(es) and, besides its task loss, "
        "a distillation loss toward stale copies of its peers, exchanged periodically.",
        "",
        "| setting | value |",
        "|---|---|",
        f"| groups (models) G | {num_groups} |",
        f"| this model's group | {group_index} |",
        f"| peer exchange period k (optimizer steps) | {args.codistill_sync_every} |",
        f"| distillation weight alpha | {args.codistill_alpha} |",
        f"| distillation loss | {args.codistill_loss} |",
        f"| temperature | {args.codistill_temperature} |",
        f"| burn-in / alpha warm-up steps | {args.codistill_burn_in_steps} / {args.codistill_alpha_warmup_steps} |",
        f"| peers | {', '.join(peers)} |",
    ]
    if base_model is not None:
        lines.append(f"| trained | adapters (PEFT) on the frozen base model {base_model}; its peers are adapters |")
    if getattr(args, "codistill_peer_store", None):
        lines.append("| peer exchange | through a peer store (groups launched apart; peers as stale as the store "
                     "made them) |")
    if dataset:
        lines.append(f"| data | {dataset if isinstance(dataset, str) else ', '.join(dataset)} |")
    for title, metrics in (("This model's evaluation", own), ("Ensemble of all models and agreement", shared)):
        if metrics:
            lines += ["", f"### {title}", "", "| metric | value |", "|---|---|"]
            lines += [f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |"
                      for key, value in metrics.items()]
    return "\n".join(lines) + "\n"


def add_codistillation_section(card_path: str, section: str) -> None:
    """Append (or replace) the section in a card Trainer has just written."""
    with open(card_path, encoding="utf-8") as f:
        card = f.read()
    if SECTION_TITLE in card:
        start = card.index(SECTION_TITLE)
        following = card.find("\n## ", start + len(SECTION_TITLE))
        card = card[:start] + (card[following + 1 :] if following != -1 else "")
    with open(card_path, "w", encoding="utf-8") as f:
        f.write(card.rstrip("\n") + "\n\n" + section)
