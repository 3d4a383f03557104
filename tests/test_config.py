"""`CodistillTrainingArguments` documents each option once, in its docstring, and `--help` shows that text."""

import dataclasses
import inspect
import re

import pytest
import torch.distributed as dist
from transformers import HfArgumentParser

from hf_codistill.config import CODISTILL_ONLY_OPTIONS, CodistillTrainingArguments
from hf_codistill.docstrings import help_from_docstring, parse_parameters

OWN_FIELDS = [f for f in dataclasses.fields(CodistillTrainingArguments)
              if f.name in inspect.get_annotations(CodistillTrainingArguments)]
# An entry's header: `name (`type`, *optional*, defaults to x):`.
ENTRY = r"\w+ \(`[^`]+`(, \*optional\*)?(, defaults to [^:]+)?\):"


def squeeze(text):
    """Without whitespace: argparse re-wraps help, breaking lines at spaces and after hyphens."""
    return "".join(text.split())


def test_each_option_help_is_its_whole_docstring_entry():
    doc = " ".join(CodistillTrainingArguments.__doc__.split())
    assert len(OWN_FIELDS) == 25
    for f in OWN_FIELDS:
        text = f.metadata["help"].replace("%%", "%")  # argparse needs `%` doubled
        assert text and "%" not in f.metadata["help"].replace("%%", "")
        # The entry's header, then exactly this text, then the next entry, the next section or the end.
        pattern = rf"\b{f.name} \(`[^`]+`[^:]*\): {re.escape(text)}(?= {ENTRY}| Parameters that|$)"
        assert re.search(pattern, doc), f.name


def test_choices_are_kept():
    choices = {f.name: f.metadata.get("choices") for f in OWN_FIELDS if "choices" in f.metadata}
    assert choices == {
        "codistill_loss": ["kl", "ce", "mse"],
        "codistill_weight_decay_schedule": ["constant", "step", "follow_lr"],
        "codistill_peer_dtype": ["float32", "bfloat16", "float16", "int8"],
    }


def test_codistill_only_options_are_those_of_the_codistill_only_sections():
    assert CODISTILL_ONLY_OPTIONS == (
        "num_groups", "codistill_alpha", "codistill_loss", "codistill_temperature", "codistill_sync_every",
        "codistill_burn_in_steps", "codistill_alpha_warmup_steps", "codistill_shared_init", "codistill_shared_batch",
        "codistill_peer_metrics", "codistill_sharded_exchange", "codistill_overlap_exchange", "codistill_peer_dtype",
        "codistill_position_fraction", "codistill_num_peers", "codistill_peer_store", "codistill_group_index",
        "codistill_peer_max_age_steps", "codistill_peer_max_age_seconds", "codistill_peer_wait_seconds",
        "codistill_peer_store_keep",
    )


def test_command_line_help_shows_the_docstring_text():
    output = squeeze(HfArgumentParser((CodistillTrainingArguments,)).format_help())
    for name in ("codistill_sync_every", "codistill_position_fraction", "codistill_log_param_distance"):
        assert squeeze(parse_parameters(CodistillTrainingArguments.__doc__)[name].text) in output, name
    assert "(0.2for15%)" in output


def test_parse_parameters_reads_sections_and_skips_prose():
    doc = """
    Intro prose, not a section.

    Parameters that do one thing (a remark
    over two lines):
        alpha (`int`, *optional*, defaults to `1`):
            First line,
            second line.
        beta (`str`, *optional*):
            Beta.

    Closing prose.
    """
    assert parse_parameters(doc) == {
        "alpha": ("Parameters that do one thing", "First line, second line."),
        "beta": ("Parameters that do one thing", "Beta."),
    }
    with pytest.raises(ValueError, match="Not a new `name"):
        parse_parameters("Summary.\n\nParameters that do:\n    alpha: no type\n")
    with pytest.raises(ValueError, match="No indented"):  # a section on the first line loses its indentation
        parse_parameters("Parameters that do:\n    alpha (`int`):\n        Alpha.\n")
    with pytest.raises(ValueError, match=r"without a description: \['alpha'\]"):
        parse_parameters("Summary.\n\nParameters that do:\n    alpha (`int`):\n")


def test_fields_and_docstring_entries_must_match():
    @dataclasses.dataclass
    class Documented:
        """A dataclass.

        Parameters that do:
            alpha (`int`, *optional*, defaults to `1`):
                Alpha at 50%.
        """

        alpha: int = dataclasses.field(default=1, metadata={"choices": [1, 2]})

    help_from_docstring(Documented)
    assert dict(dataclasses.fields(Documented)[0].metadata) == {"choices": [1, 2], "help": "Alpha at 50%%."}

    @dataclasses.dataclass
    class Undocumented:
        """A dataclass.

        Parameters that do:
            alpha (`int`, *optional*, defaults to `1`):
                Alpha.
        """

        alpha: int = 1
        beta: int = 0

    with pytest.raises(ValueError, match=r"fields without an entry: \['beta'\]"):
        help_from_docstring(Undocumented)

    @dataclasses.dataclass
    class Stale:
        """A dataclass.

        Parameters that do:
            gamma (`int`):
                Gone.
        """

    with pytest.raises(ValueError, match=r"entries without a field: \['gamma'\]"):
        help_from_docstring(Stale)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"codistill_temperature": 0.0}, "`codistill_temperature` must be > 0"),
        ({"codistill_sync_every": 0}, "`codistill_sync_every` must be >= 1"),
        ({"codistill_weight_decay_schedule": "cosine"}, "`codistill_weight_decay_schedule` must be one of"),
    ],
)
def test_range_checks_name_the_parameter(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        CodistillTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, **kwargs)
    assert not dist.is_initialized()


@pytest.mark.parametrize("num_peers", [0, 3, -1])
def test_a_number_of_peers_outside_one_to_g_minus_one_names_the_range(num_peers):
    with pytest.raises(ValueError, match=r"`codistill_num_peers` must be between 1 and num_groups - 1 = 2"):
        CodistillTrainingArguments("x", codistill=True, num_groups=3, codistill_num_peers=num_peers, use_cpu=True)


def test_deepspeed_is_refused_naming_fsdp2():
    with pytest.raises(ValueError, match=r"`deepspeed` is not supported with `codistill=True`.*FSDP2 is the sharding"):
        CodistillTrainingArguments("x", codistill=True, use_cpu=True, deepspeed={"zero_optimization": {"stage": 2}})


@pytest.mark.parametrize("sharding", [
    {"fsdp": "full_shard", "fsdp_config": {"version": 1}},
    {"fsdp": True, "fsdp_config": {"fsdp_version": 1}},
])
def test_fsdp1_is_refused_naming_fsdp2(sharding):
    with pytest.raises(ValueError, match=r"FSDP version 1 is not supported with `codistill=True`.*fsdp_config"):
        CodistillTrainingArguments("x", codistill=True, use_cpu=True, **sharding)


def test_fsdp_from_an_accelerate_config_counts_and_defaults_to_fsdp1(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch --use_fsdp` sets
    with pytest.raises(ValueError, match="FSDP version 1 is not supported"):
        CodistillTrainingArguments("x", codistill=True, use_cpu=True)
    monkeypatch.setenv("FSDP_VERSION", "2")
    with pytest.raises(ValueError, match="and this is one process"):
        CodistillTrainingArguments("x", codistill=True, use_cpu=True)


def test_fsdp_in_one_process_or_with_one_process_per_group_is_refused(monkeypatch, tmp_path):
    config = tmp_path / "fsdp.json"  # `fsdp_config` as a file, as on the command line
    config.write_text('{"fsdp_version": 2}')
    with pytest.raises(ValueError, match=r"and this is one process: the models it trains \(a list of models"):
        CodistillTrainingArguments("x", codistill=True, use_cpu=True, fsdp="full_shard", fsdp_config=str(config))
    monkeypatch.setenv("CODISTILL_WORLD_SIZE", "2")  # as a launch of 2 processes for 2 groups
    with pytest.raises(ValueError, match=r"gives each group one process, over which there is nothing to shard"):
        CodistillTrainingArguments("x", codistill=True, use_cpu=True, fsdp=True)


@pytest.mark.parametrize("kwargs, message", [
    ({"codistill_peer_dtype": "bfloat16"}, r"`codistill_peer_dtype='bfloat16'` is not supported with FSDP2 groups"),
    ({"codistill_peer_store": "/tmp/store", "codistill_group_index": 0},
     "`codistill_peer_store` publishes each group's model whole"),
    ({"fsdp_config": {"cpu_offload": True}}, "FSDP2's CPU offload is not supported"),
    ({"fsdp_config": "offload.json"}, "FSDP2's CPU offload is not supported"),
])
def test_fsdp2_refuses_what_its_peers_cannot_do(monkeypatch, tmp_path, kwargs, message):
    monkeypatch.setenv("CODISTILL_WORLD_SIZE", "4")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "offload.json").write_text('{"fsdp_version": 2, "fsdp_cpu_offload": "true"}')
    with pytest.raises(ValueError, match=message):
        CodistillTrainingArguments("x", codistill=True, use_cpu=True, fsdp=True, **kwargs)


def test_fsdp2_with_two_processes_per_group_is_accepted():
    from hf_codistill.sharding import check_sharding_arguments, requested_sharding

    args = CodistillTrainingArguments("x", use_cpu=True, fsdp=True, fsdp_config={"version": 2})
    args.codistill = True
    assert requested_sharding(args) == ("fsdp", 2)
    check_sharding_arguments(args, world_size=4)  # 2 groups of 2: nothing to refuse
