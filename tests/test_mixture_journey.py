"""Mixtures as users run them, through ./start_training.sh: a 3-source mixture with a stage change preempted and
resumed on a new VM ends as if never interrupted; token shares match the weights on 2 processes and after resuming on
1; data grows mid-run and the pre-growth checkpoint keeps its order; bad mixtures are one line and exit 2; a small
corpus prepared with the defaults trains with the defaults on its held-out split."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pretrain.checkpoint.format import load_checkpoint, step_of
from pretrain.data.sources import MixtureOrder
from pretrain.data.synthetic import generate_sample_data
from pretrain.data.training_data import frozen_from_json
from pretrain.prepare.sample_text import write_sample_text
from pretrain.protocol import EXIT_PREEMPTED
from tests.launcher import (
    REPO,
    Watched,
    check,
    checkpoints,
    final_weights,
    free_port,
    last_line,
    launch,
    logged,
)
from tests.vms import new_vm, vm_losses

pytestmark = pytest.mark.slow
SEQ_LEN = 128
SHORT = ["--logging-steps", "1", "--eval-steps", "0", "--warmup-steps", "2"]


def write_source(folder: Path, seed: int, shards: int = 4, tokens: int = 16384) -> Path:
    generate_sample_data(folder, num_shards=shards, tokens_per_shard=tokens, seed=seed)
    return folder


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """Three synthetic sources of different languages and sizes; `math` is small and runs out first."""
    root = tmp_path_factory.mktemp("sources")
    return {"web": write_source(root / "web", 1, shards=5), "code": write_source(root / "code", 2),
            "math": write_source(root / "math", 3, shards=3, tokens=8192)}


def mixture_file(path: Path, urls: dict[str, str], weights: dict[str, float], stages: str = "") -> str:
    lines = ["sources:"] + [f"  - {{name: {name}, url: '{urls[name]}', weight: {weights[name]}}}" for name in weights]
    path.write_text("\n".join(lines) + "\n" + stages)
    return str(path)


def record(workdir: Path):
    """The newest checkpoint's TrainState (by step: names sort by epoch first)."""
    return load_checkpoint(workdir / "checkpoints" / max(checkpoints(workdir), key=step_of)).state


def test_a_three_source_mixture_with_a_stage_change_resumes_after_sigterm_exactly(tmp_path, sources):
    urls = {name: folder.as_uri() for name, folder in sources.items()}  # buckets: each VM fetches every source
    stages = "stages:\n  - {step: 6, weights: {code: 0.5, math: 0.5}}\n"  # web drops out at step 6
    mixture = mixture_file(tmp_path / "mixture.yaml", urls, {"web": 0.5, "code": 0.3, "math": 0.2}, stages)
    schedule = ["--max-steps", "12", "--save-steps", "4", *SHORT, "--run-name", "mix"]

    def command(vm: Path) -> list[str]:
        return [str(vm / "start_training.sh"), "--config", "test", "--data-mixture", mixture, "--checkpoint-bucket",
                (tmp_path / f"ckpt-{vm.name.split('-')[0]}").as_uri(), "--resume", "auto", *schedule]

    straight = new_vm(tmp_path, "straight-vm")
    run = Watched(command(straight), with_stdout=True)
    assert run.finish(timeout=600) == 0, run.text()[-3000:]
    assert "data: mixture of 3 sources, weights at step 1: web 50%" in run.text()

    vm1 = new_vm(tmp_path, "journey-vm1")
    run = Watched(command(vm1), with_stdout=True)
    run.wait_for("step 3/")
    run.process.send_signal(signal.SIGTERM)
    assert run.finish(timeout=300) == EXIT_PREEMPTED, run.text()[-3000:]
    vm2 = new_vm(tmp_path, "journey-vm2")  # an empty disk: every source is fetched again into data/NAME
    run = Watched(command(vm2), with_stdout=True)
    assert run.finish(timeout=600) == 0, run.text()[-3000:]
    assert "resuming from" in run.text() and {p.name for p in (vm2 / "data").iterdir() if p.is_dir()} == set(sources)

    expected = vm_losses(straight, run_name="mix")
    assert sorted(expected) == list(range(1, 13))
    assert vm_losses(vm1, vm2, run_name="mix") == expected  # the same float at every step
    a, b = (load_file(str(vm / "checkpoints" / "final-model" / "model.safetensors")) for vm in (vm2, straight))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)

    # The tokens of each source, logged from the order: web stops at the stage; the rest share what is left.
    tokens = {name: vm_losses_key(vm2, f"data/tokens/{name}") for name in sources}
    assert tokens["web"][12] == tokens["web"][6] == 6 * 16 * SEQ_LEN // 2
    assert tokens["code"][12] - tokens["code"][6] == tokens["math"][12] - tokens["math"][6] == 6 * 8 * SEQ_LEN
    state = record(vm2)
    assert {name: numbers["tokens"] for name, numbers in state.data_consumed.items()} == {
        name: tokens[name][12] for name in sources}
    evaluated = [json.loads(line) for line in (vm2 / "logs" / "mix" / "metrics.jsonl").read_text().splitlines()
                 if "eval/loss" in line]
    assert {f"eval/loss/{name}" for name in sources} <= set(evaluated[-1])


def vm_losses_key(vm: Path, key: str) -> dict[int, float]:
    values = {}
    for line in (vm / "logs" / "mix" / "metrics.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if key in entry:
            values[entry["step"]] = entry[key]
    return values


def test_token_shares_match_the_weights_on_2_processes_and_after_resuming_on_1(tmp_path, sources):
    weights = {"web": 0.5, "code": 0.3, "math": 0.2}
    mixture = ",".join(f"{name}={folder}:{weights[name]}" for name, folder in sources.items())
    tiny = ["--hidden-size", "32", "--num-hidden-layers", "1", "--num-attention-heads", "2", "--intermediate-size",
            "64", "--seq-len", "32", "--data-mixture", mixture, "--save-steps", "150", "--logging-steps", "50",
            "--eval-steps", "0", "--lr-decay-steps", "300", "--export-final-model", "false"]
    data = tmp_path / "data"
    check(launch(tmp_path, data, *tiny, "--max-steps", "150", "--cpu-processes", "2", "--main-port",
                 str(free_port()), "--per-device-train-batch-size", "4", "--gradient-accumulation-steps", "2"))
    resumed = check(launch(tmp_path, data, *tiny, "--max-steps", "300", "--resume", "latest",
                           "--per-device-train-batch-size", "8", "--gradient-accumulation-steps", "2"))
    assert "source math ran out of samples and starts its epoch" in resumed.stderr
    total = {step: 16 * 32 * step for step in (150, 300)}
    for step in (150, 300):
        shares = {name: logged(tmp_path, f"data/tokens/{name}")[step] / total[step] for name in weights}
        for name, weight in weights.items():
            assert abs(shares[name] - weight) < 0.01 * weight, (step, shares)
    # Counted from the order the ranks read, not from the weights: the checkpoint's record gives the same numbers.
    state = record(tmp_path)
    order = MixtureOrder(frozen_from_json(state.data), 32, state.seed)
    assert state.samples_consumed == 300 * 16 and state.num_processes == 1
    counted = {name: 0 for name in weights}
    for index in range(state.samples_consumed):
        counted[state.data["sources"][order.locate_part(index)[0]]["name"]] += 32
    assert {name: numbers["tokens"] for name, numbers in state.data_consumed.items()} == counted
    assert counted == {name: logged(tmp_path, f"data/tokens/{name}")[300] for name in weights}


def test_data_grows_mid_run_and_the_pre_growth_checkpoint_keeps_its_order(tmp_path, sources):
    buckets = tmp_path / "buckets"
    for name in ("web", "code", "math"):
        shutil.copytree(sources[name], buckets / name)
    urls = {name: (buckets / name).as_uri() for name in sources}
    before = mixture_file(tmp_path / "before.yaml", urls, {"web": 0.6, "code": 0.4})
    schedule = ["--max-steps", "12", "--save-steps", "6", *SHORT]
    straight = tmp_path / "straight"
    check(launch(straight, tmp_path / "data-straight", "--data-mixture", before, *schedule))
    pre_growth = next(name for name in checkpoints(straight) if "-step6-" in name)

    def copy_of_run(workdir: Path) -> None:
        shutil.copytree(straight / "checkpoints" / pre_growth, workdir / "checkpoints" / pre_growth)

    generate_sample_data(buckets / "web" / "more", num_shards=2, tokens_per_shard=16384, seed=4)  # appended shards
    after = mixture_file(tmp_path / "after.yaml", urls, {"web": 0.5, "code": 0.25, "math": 0.25})
    grown = tmp_path / "grown"
    copy_of_run(grown)
    result = check(launch(grown, tmp_path / "data-grown", "--data-mixture", after, "--data-growth", "true",
                          "--resume", pre_growth, *schedule))
    said = [line.split("data growth at step 6: ", 1)[1] for line in result.stderr.splitlines()
            if "data growth at step 6: " in line]
    assert said[0].startswith("web: +2 shards") and said[1].startswith("math: new source")
    assert said[2] == "weights from sample 96 on: web 50%, code 25%, math 25%" and len(said) == 3
    state = record(grown)
    assert state.data["growth"][0]["at"] == 96 and state.data["growth"][0]["lines"] == said
    assert logged(grown, "data/tokens/math")[12] == 6 * 16 * SEQ_LEN // 4
    # Every sample of the grown run is consumed at most once (from the order, over the whole run).
    order = MixtureOrder(frozen_from_json(state.data), SEQ_LEN, state.seed)
    identities = [order.locate(i) for i in range(state.samples_consumed)]
    assert len(identities) == len(set(identities)) == 12 * 16

    back = tmp_path / "back"  # the pre-growth checkpoint, resumed as it was started: its own order, to the bit
    copy_of_run(back)
    check(launch(back, tmp_path / "data-back", "--data-mixture", before, "--resume", pre_growth, *schedule))
    reference = logged(straight)
    assert {step: loss for step, loss in logged(back).items()} == {s: reference[s] for s in range(7, 13)}
    assert logged(grown)[7] != reference[7]
    a, b = final_weights(back), final_weights(straight)
    assert all(torch.equal(a[k], b[k]) for k in a)


def write_tokenizer_manifest(folder: Path, tokenizer: bytes) -> None:
    (folder / "tokenizer.json").write_bytes(tokenizer)
    shards = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.npz"))
    entries = [{"path": p, "num_tokens": int(np.load(folder / p)["input_ids"].size),
                "size_bytes": (folder / p).stat().st_size} for p in shards]
    (folder / "dataset.json").write_text(json.dumps({
        "format_version": 2, "tokenizer": {"file": "tokenizer.json", "sha256": hashlib.sha256(tokenizer).hexdigest()},
        "vocab_size": 512, "eos_token_id": 0, "shards": entries, "eval_shards": []}))


@pytest.mark.parametrize("case", ["weights", "missing", "tokenizers"])
def test_a_bad_mixture_is_one_line_and_exit_2(tmp_path, sources, case):
    web, code = tmp_path / "web", tmp_path / "code"
    shutil.copytree(sources["web"], web)
    shutil.copytree(sources["code"], code)
    mixture, fragment = {
        "weights": (f"web={web}:0.7,code={code}:lots", "--data-mixture web="),
        "missing": (f"web={web}:1,books={tmp_path / 'books'}:1", "--data-mixture: source books"),
        "tokenizers": (f"web={web}:1,code={code}:1", "--data-mixture: sources web and code were tokenized differently"),
    }[case]
    if case == "tokenizers":
        write_tokenizer_manifest(web, b'{"one": 1}')
        write_tokenizer_manifest(code, b'{"two": 2}')
    result = launch(tmp_path, tmp_path / "data", "--data-mixture", mixture, "--max-steps", "2")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    line = last_line(result.stderr)
    assert "error" in line and fragment in line, result.stderr[-2000:]
    if case == "weights":
        assert "'lots', which does not parse as a number" in line
    assert checkpoints(tmp_path) == []


def test_a_small_corpus_prepared_with_the_defaults_trains_with_the_defaults_on_its_held_out_split(tmp_path):
    text = tmp_path / "text"
    write_sample_text(text, 200_000)  # about 100k tokens at a 512-token vocabulary
    prepared = tmp_path / "data-text"
    prep = subprocess.run([sys.executable, "-m", "pretrain.prepare_data", str(text), "--out", str(prepared),
                           "--train-tokenizer", "--vocab-size", "512"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert prep.returncode == 0, prep.stderr
    manifest = json.loads((prepared / "dataset.json").read_text())
    assert len(manifest["shards"]) == 1 and len(manifest["eval_shards"]) == 1  # one shard: the old rule had none left
    assert 80_000 < manifest["totals"]["tokens"] < 130_000

    result = check(launch(tmp_path, prepared, "--final-samples", "0"))  # the test config's defaults: 150 steps
    assert "1 training shards" in result.stderr and "1 held out for evaluation" in result.stderr
    evals = logged(tmp_path, "eval/loss")
    assert sorted(evals) == [50, 100, 150] and evals[150] < evals[50]
    state = record(tmp_path)
    assert [s["path"] for s in state.data["eval"]] == ["eval_00000.npz"] and state.step == 150
