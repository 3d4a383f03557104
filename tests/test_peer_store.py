"""Groups launched apart, meeting through a peer store: the store's files, the peer set, and real launches (two
separate torchrun launches over a temporary folder: heterogeneous widths, a group killed and resumed alone)."""

import json
import os
import signal
import subprocess
import sys
import time

import fsspec
import psutil
import pytest
import torch
from fsspec.implementations.local import LocalFileSystem
from transformers import GPT2Config, GPT2LMHeadModel, ViTForImageClassification
from transformers.testing_utils import CaptureLogger

from hf_codistill import CodistillTrainer, CodistillTrainingArguments
from hf_codistill.checkpointing import STATE_NAME
from hf_codistill.config import logger as config_logger
from hf_codistill.peer_store import INIT_VERSION, MANIFEST_NAME, WEIGHTS_NAME, PeerStore, redacted
from hf_codistill.peer_store import logger as store_logger
from hf_codistill.store_peers import StorePeers
from hf_codistill.store_peers import logger as peers_logger
from tests.conftest import REPO, SCRIPTS, _free_port, clean_env
from tests.scripts.train_digits import digits_dataset, tiny_vit

SCRIPT = SCRIPTS / "train_digits.py"


def _version(store_dir, group, step):
    return store_dir / f"group_{group}" / f"step-{step:09d}"


def test_a_published_version_reads_back_and_loads_with_from_pretrained(tmp_path):
    torch.manual_seed(0)
    model = tiny_vit(48)
    store = PeerStore(str(tmp_path), group=1)
    version = store.publish(model, step=5)
    loaded = PeerStore(str(tmp_path), group=0).read_newest(1)
    assert loaded.version.step == 5 and loaded.version.sha256 == version.sha256
    assert loaded.version.outputs == {"kind": "labels", "size": 10}
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.tensors()[name], tensor), name
    # Each version is a `from_pretrained` folder.
    reloaded = ViTForImageClassification.from_pretrained(_version(tmp_path, 1, 5)).eval()
    pixels = torch.rand(3, 1, 8, 8)
    assert torch.equal(reloaded(pixel_values=pixels).logits, model.eval()(pixel_values=pixels).logits)
    assert store.bytes_written > version.num_bytes  # weights, config and manifest


def test_a_truncated_or_corrupt_version_is_skipped_with_a_warning(tmp_path):
    store = PeerStore(str(tmp_path), group=0, keep=5)
    for step in (5, 10, 15):
        store.publish(tiny_vit(), step)
    reader = PeerStore(str(tmp_path), group=1)
    weights = _version(tmp_path, 0, 15) / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    flipped = bytearray((_version(tmp_path, 0, 10) / WEIGHTS_NAME).read_bytes())
    flipped[-1] ^= 0xFF  # same length, one byte changed
    (_version(tmp_path, 0, 10) / WEIGHTS_NAME).write_bytes(bytes(flipped))
    with CaptureLogger(store_logger) as captured:
        loaded = reader.read_newest(0)
    assert loaded.version.step == 5
    assert captured.out.count("do not match its manifest's checksum") == 2
    # A version whose manifest is not written yet (cut short while publishing) does not exist for readers.
    (_version(tmp_path, 0, 5) / MANIFEST_NAME).unlink()
    assert reader.read_newest(0) is None


def test_old_and_abandoned_versions_are_pruned_and_a_fresh_run_clears_its_own(tmp_path):
    store = PeerStore(str(tmp_path), group=0, keep=2)
    store.publish(tiny_vit(), 0, name=INIT_VERSION)
    for step in (5, 10, 15, 20):
        store.publish(tiny_vit(), step)
    assert sorted(os.listdir(tmp_path / "group_0")) == [INIT_VERSION, "step-000000015", "step-000000020"]
    store.publish(tiny_vit(), 10)  # resumed from step 10: its versions past it belong to an abandoned trajectory
    assert sorted(os.listdir(tmp_path / "group_0")) == [INIT_VERSION, "step-000000010"]
    StorePeers(tiny_vit(), store, num_groups=2, fresh=True)
    assert not (tmp_path / "group_0").exists()


def test_credentials_never_reach_the_logs():
    assert redacted("s3://key:secret@bucket/run") == "s3://bucket/run"
    assert redacted("/shared/run") == "/shared/run"


def test_peers_of_another_width_stale_and_back_in_one_process(tmp_path):
    """Two groups' peer sets over one folder (one process each, no launcher): a wider peer is built from its config;
    a peer too many steps behind leaves the term with a warning and comes back when it publishes again."""
    torch.manual_seed(0)
    narrow, wide = tiny_vit(32), tiny_vit(48)
    group_0 = StorePeers(narrow, PeerStore(str(tmp_path), 0), num_groups=2, max_age_steps=5)
    group_1 = StorePeers(wide, PeerStore(str(tmp_path), 1), num_groups=2, max_age_steps=5)
    group_0.refresh(0)
    assert group_0.peers_of(0) == {} and group_0.counters()["peers_live"] == 0
    group_1.refresh(0)
    group_0.refresh(5)
    peer = group_0.peers_of(0)[1]
    assert peer.config.hidden_size == 48 and not peer.training
    assert all(not p.requires_grad for p in peer.parameters())
    pixels = torch.rand(2, 1, 8, 8)
    assert torch.equal(peer(pixel_values=pixels).logits, wide.eval()(pixel_values=pixels).logits)
    assert group_0.counters()["peer_1_step"] == 0 and group_1.peers_of(1)[0].config.hidden_size == 32
    with CaptureLogger(peers_logger) as captured:
        group_0.refresh(10)  # group 1 is 10 steps behind
    assert group_0.live == [] and "peer group 1 is stale" in captured.out
    group_1.refresh(10)
    group_0.refresh(15)
    assert group_0.live == [1] and group_0.counters()["peer_1_step"] == 10


def test_a_store_that_fails_never_stops_training(tmp_path):
    """A store that cannot be written or read (here a path under a regular file) costs versions, not the run."""
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    peers = StorePeers(tiny_vit(), PeerStore(str(blocker / "store"), 0), num_groups=2, fresh=False)
    with CaptureLogger(peers_logger) as published, CaptureLogger(store_logger) as read:
        peers.refresh(5)
    assert "could not publish" in published.out and "Cannot list" in read.out
    assert peers.live == [] and peers.counters()["peer_store_publish_failures"] == 1


def test_a_peer_with_other_outputs_is_refused_naming_both(tmp_path):
    torch.manual_seed(0)
    five_labels = ViTForImageClassification(tiny_vit().config.__class__(**{**tiny_vit().config.to_dict(),
                                                                           "num_labels": 5}))
    StorePeers(five_labels, PeerStore(str(tmp_path), 1), num_groups=2).refresh(0)
    with pytest.raises(ValueError, match="over 5 labels.*group 0 trains ViTForImageClassification over 10 labels"):
        StorePeers(tiny_vit(), PeerStore(str(tmp_path), 0), num_groups=2).refresh(0)


def test_language_models_of_two_sizes_share_a_vocabulary_and_no_other(tmp_path):
    """A small and a larger GPT-2 are peers (the same 64 tokens); a vocabulary of another size is refused."""
    def gpt2(width, vocab=64):
        torch.manual_seed(width)
        return GPT2LMHeadModel(GPT2Config(n_embd=width, n_layer=1, n_head=2, vocab_size=vocab, n_positions=16))

    small, large = gpt2(16), gpt2(32)
    StorePeers(large, PeerStore(str(tmp_path), 1), num_groups=2).refresh(0)
    peers = StorePeers(small, PeerStore(str(tmp_path), 0), num_groups=2)
    peers.refresh(0)
    tokens = torch.randint(0, 64, (2, 8))
    peer = peers.peers_of(0)[1]
    assert peer.config.n_embd == 32
    assert torch.equal(peer(input_ids=tokens).logits, large.eval()(input_ids=tokens).logits)
    StorePeers(gpt2(32, vocab=80), PeerStore(str(tmp_path / "other"), 1), num_groups=2).refresh(0)
    with pytest.raises(ValueError, match="over a vocabulary of 80.*GPT2LMHeadModel over a vocabulary of 64"):
        StorePeers(small, PeerStore(str(tmp_path / "other"), 0), num_groups=2).refresh(0)


def test_a_config_naming_a_class_outside_transformers_is_refused(tmp_path):
    StorePeers(tiny_vit(48), PeerStore(str(tmp_path), 1), num_groups=2).refresh(0)
    config = _version(tmp_path, 1, 0) / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "architectures": ["os.system"]}))
    with pytest.raises(ValueError, match="not a model class of `transformers`"):
        StorePeers(tiny_vit(), PeerStore(str(tmp_path), 0), num_groups=2).refresh(0)


def test_peer_store_arguments(tmp_path, monkeypatch):
    common = {"output_dir": str(tmp_path), "codistill": True, "report_to": [], "codistill_peer_store": str(tmp_path)}
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    with pytest.raises(ValueError, match="--codistill_group_index"):
        CodistillTrainingArguments(**common)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "6")
    assert CodistillTrainingArguments(**common).group_index == 1
    with pytest.raises(ValueError, match="between 0 and num_groups - 1 = 1"):
        CodistillTrainingArguments(**common, codistill_group_index=2)
    with pytest.raises(ValueError, match="codistill_peer_max_age_seconds"):
        CodistillTrainingArguments(**common, codistill_group_index=0, codistill_peer_max_age_seconds=-1)
    with pytest.raises(ValueError, match="Drop one of the two"):
        CodistillTrainingArguments(**common, codistill_group_index=0, codistill_overlap_exchange=True)
    without_store = {key: value for key, value in common.items() if key != "codistill_peer_store"}
    with CaptureLogger(config_logger) as captured:
        CodistillTrainingArguments(**without_store, codistill_peer_max_age_seconds=5)
    assert "`codistill_peer_max_age_seconds` only act on groups launched apart" in captured.out
    args = CodistillTrainingArguments(**common, codistill_group_index=0)
    with pytest.raises(ValueError, match="publishes each model with its config"):
        StorePeers.from_arguments(torch.nn.Linear(2, 2), args, fresh=False)
    with pytest.raises(ValueError, match="one group with one model"):
        CodistillTrainer(model=[tiny_vit(), tiny_vit()], args=args, train_dataset=digits_dataset(32)[0])


# ---- Real launches: each group its own torchrun ---------------------------------------------------------------------

COMMON = ["--per_device_train_batch_size", "16", "--logging_steps", "5", "--report_to", "none", "--learning_rate",
          "3e-3", "--seed", "42", "--codistill", "--num_groups", "2", "--codistill_sync_every", "5"]


def _start(group, nproc, out, store, results, *args, log):
    """Launch group `group` on its own: its own torchrun and rendezvous."""
    results.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(_free_port()), str(SCRIPT), *COMMON, "--output_dir", str(out), "--codistill_peer_store",
               str(store), "--codistill_group_index", str(group), *args, f"--x-results={results}"]
    env = clean_env(OMP_NUM_THREADS="1")
    return subprocess.Popen(command, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def _kill_tree(process):
    """SIGKILL a launch: the launcher and its workers (torchrun starts each worker in a session of its own)."""
    workers = psutil.Process(process.pid).children(recursive=True)
    for victim in [*workers, psutil.Process(process.pid)]:
        victim.send_signal(signal.SIGKILL)
    psutil.wait_procs(workers, timeout=30)
    process.wait(timeout=30)


def _finish(process, log_path, timeout=300):
    assert process.wait(timeout=timeout) == 0, log_path.read_text()[-6000:]


def _ranks(results):
    return [json.loads(path.read_text()) for path in sorted(results.glob("rank*.json"))]


def test_two_launches_of_other_widths_train_together_through_the_store(tmp_path):
    """Group 0 (width 32, 2 processes) and group 1 (width 48, 1 process) as two launches: both finish and improve,
    log their peers' steps and the store's bytes, score agreement at evaluation; group 0's ranks hold one peer."""
    store, out = tmp_path / "store", tmp_path / "out"
    runs = {}
    for group, nproc, width in ((0, 2, 32), (1, 1, 48)):
        log_path = tmp_path / f"group_{group}.log"
        with open(log_path, "w") as log:
            process = _start(group, nproc, out, store, tmp_path / f"results_{group}", "--max_steps", "30",
                             "--eval_strategy", "steps", "--eval_steps", "30", "--eval_on_start", "true",
                             f"--x-hidden_size={width}", "--x-accuracy=1", "--x-await_peers=120", "--x-save=1",
                             "--x-step_delay=0.3", log=log)
        runs[group] = (process, log_path)
    for process, log_path in runs.values():
        _finish(process, log_path)
    for group, width in ((0, 32), (1, 48)):
        ranks = _ranks(tmp_path / f"results_{group}")
        history = ranks[0]["log_history"]
        evals = [entry for entry in history if "eval_loss" in entry]
        assert evals[-1]["eval_loss"] < evals[0]["eval_loss"], evals
        assert "eval_agreement_0_1" in ranks[0]["eval"] and "eval_ensemble_accuracy" in ranks[0]["eval"]
        logged = [entry for entry in history if "peers_live" in entry]
        assert logged and all(entry["peer_store_bytes_written"] > 0 for entry in logged)
        assert any(f"peer_{1 - group}_step" in entry and entry["peer_store_bytes_read"] > 0 for entry in logged)
        assert ViTForImageClassification.from_pretrained(out / f"group_{group}").config.hidden_size == width
        if group == 0:  # one read per group, the same peer on every rank
            assert ranks[0]["final_params"] == ranks[1]["final_params"]
            for mine, theirs in zip(ranks[0]["steps"], ranks[1]["steps"]):
                assert mine["peers"] == theirs["peers"]


@pytest.mark.slow  # three launches, one of them long enough to outlive the kill
def test_a_killed_group_resumes_alone_while_the_other_finishes(tmp_path):
    """SIGKILL group 0 after its first complete checkpoint: group 1 finishes without waiting, logs group 0 as stale
    once its version is older than the bound; group 0 relaunched resumes from its own last complete checkpoint."""
    store, out = tmp_path / "store", tmp_path / "out"
    slow_log, victim_log = tmp_path / "group_1.log", tmp_path / "group_0.log"
    with open(slow_log, "w") as log:
        survivor = _start(1, 1, out, store, tmp_path / "results_1", "--max_steps", "80", "--save_steps", "20",
                          "--codistill_peer_max_age_seconds", "3", "--x-step_delay=0.25", log=log)
    with open(victim_log, "w") as log:
        victim = _start(0, 1, out, store, tmp_path / "results_0", "--max_steps", "40", "--save_steps", "10",
                        "--x-step_delay=0.1", log=log)
    first = out / "group_0" / "checkpoint-10" / STATE_NAME
    deadline = time.monotonic() + 240
    while not first.is_file() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert first.is_file(), victim_log.read_text()[-4000:]
    _kill_tree(victim)
    _finish(survivor, slow_log)
    survivor_logs = _ranks(tmp_path / "results_1")[0]["log_history"]
    assert "peer group 0 is stale" in slow_log.read_text()
    assert [entry for entry in survivor_logs if "loss" in entry][-1]["peers_live"] == 0
    assert all((out / "group_1" / f"checkpoint-{step}" / STATE_NAME).is_file() for step in (20, 40, 60, 80))

    complete = sorted(int(p.parent.name.split("-")[1]) for p in (out / "group_0").glob(f"checkpoint-*/{STATE_NAME}"))
    with open(victim_log, "a") as log:
        resumed = _start(0, 1, out, store, tmp_path / "results_0b", "--max_steps", "40", "--save_steps", "10",
                         "--x-resume=true", log=log)
    _finish(resumed, victim_log)
    steps = [record["step"] for record in _ranks(tmp_path / "results_0b")[0]["steps"]]
    assert steps == list(range(complete[-1] + 1, 41))  # this launch trained from its last complete checkpoint on
    assert all((out / "group_0" / f"checkpoint-{step}" / STATE_NAME).is_file() for step in complete)


class ListingCacheFileSystem(LocalFileSystem):
    """A local store whose listings are cached until invalidated, as s3fs and gcsfs cache them."""

    protocol = "listingcache"
    listings: dict = {}

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.removeprefix("listingcache://"))

    def ls(self, path, detail=False, **kwargs):
        path = self._strip_protocol(path)
        if path not in self.listings:
            self.listings[path] = super().ls(path, detail=detail, **kwargs)
        return self.listings[path]

    def invalidate_cache(self, path=None):
        self.listings.clear()


def test_new_versions_are_seen_through_a_store_that_caches_listings(tmp_path):
    fsspec.register_implementation("listingcache", ListingCacheFileSystem, clobber=True)
    url = f"listingcache://{tmp_path}"
    writer, reader = PeerStore(url, group=1), PeerStore(url, group=0)
    model = tiny_vit()
    writer.publish(model, step=1)
    assert reader.read_newest(1).version.step == 1
    writer.publish(model, step=2)
    assert reader.read_newest(1).version.step == 2
