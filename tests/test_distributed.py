"""Multi-process evaluation on CPU (gloo): two ranks give the single-process results, and a failed rank fails all."""

import json
import os
import socket
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hf_dawin.distributed import (
    DistributedState,
    RankFailedError,
    RankLostError,
    dataset_shard_batches,
    get_distributed_state,
)
from hf_dawin.evaluation import EvaluationSet, EvaluationSettings, evaluate_pair

from .test_evaluation import _image_dataset


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _environment() -> dict[str, str]:
    # One intra-op thread in every process, as torchrun sets, so batches compute identically everywhere.
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def evaluate_arguments(tiny_pair_dirs, tmp_path_factory):
    data = tmp_path_factory.mktemp("distributed_data")
    # 13 and 11 examples in batches of 3: the ranks get different numbers of batches and a short last batch.
    id_dir = _image_dataset(data / "id", 0, count=13)
    shift_dir = _image_dataset(data / "shift", 1, count=11, invert=True)
    return [
        "evaluate", "--zero-shot", str(tiny_pair_dirs[0]), "--fine-tuned", str(tiny_pair_dirs[1]),
        "--id-dataset", str(id_dir), "--shift-dataset", f"inverted={shift_dir}", "--batch-size", "3",
        "--alphas", "0,0.5,1", "--offset-adjustment",
    ]


def _run(command, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, env=_environment(), timeout=600, **kwargs)


def _torchrun(log_dir, *arguments) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(_free_port()), "--log-dir", str(log_dir), "--redirects", "3", *arguments]


def _rank_logs(log_dir, rank: int, stream: str) -> str:
    paths = list(log_dir.glob(f"*/attempt_0/{rank}/{stream}.log"))
    assert len(paths) == 1, paths
    return paths[0].read_text()


def _results(directory, num_processes: int) -> dict:
    """Read results.json without the entries that differ between runs: run time, progress bars, process count."""
    results = json.loads((directory / "results.json").read_text())
    results.pop("runtime_seconds")
    results["settings"].pop("progress")
    assert results["settings"].pop("num_processes") == num_processes
    return results


@pytest.fixture(scope="module")
def single_process_results(evaluate_arguments, tmp_path_factory):
    output = tmp_path_factory.mktemp("single") / "results"
    completed = _run([sys.executable, "-m", "hf_dawin.cli", *evaluate_arguments, "--output-dir", str(output),
                      "--no-progress"])
    assert completed.returncode == 0, completed.stderr[-3000:]
    return output


@pytest.mark.slow
def test_accelerate_launch_matches_single_process(evaluate_arguments, single_process_results, tmp_path):
    output = tmp_path / "results"
    completed = _run([
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()), "-m", "hf_dawin.cli", *evaluate_arguments,
        "--output-dir", str(output), "--no-progress",
    ])
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.count("Results written to") == 1
    assert _results(output, 2) == _results(single_process_results, 1)
    single = np.load(single_process_results / "coefficients.npz")
    multi = np.load(output / "coefficients.npz")
    for name in single.files:
        np.testing.assert_array_equal(multi[name], single[name])


@pytest.mark.slow
def test_torchrun_logs_on_main_process_only(evaluate_arguments, single_process_results, tmp_path):
    output = tmp_path / "results"
    completed = _run(_torchrun(tmp_path / "logs", "-m", "hf_dawin.cli", *evaluate_arguments,
                               "--output-dir", str(output)))
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert _results(output, 2) == _results(single_process_results, 1)
    assert "Accuracy (%) per set" in _rank_logs(tmp_path / "logs", 0, "stdout")
    assert _rank_logs(tmp_path / "logs", 1, "stdout").strip() == ""
    # Progress bars (model loading, head building, evaluation passes) appear on rank 0 only.
    assert "it/s" in _rank_logs(tmp_path / "logs", 0, "stderr")
    assert "it/s" not in _rank_logs(tmp_path / "logs", 1, "stderr")


FAILING_CLI = textwrap.dedent(
    """
    # Rank 1 raises after its first batch of every pass; the other rank runs normally.
    import os
    import sys

    import hf_dawin.cli as cli

    original = cli.iter_image_batches

    def failing_batches(*args, **kwargs):
        for position, batch in enumerate(original(*args, **kwargs)):
            if position >= 1 and os.environ["RANK"] == "1":
                raise OSError("simulated read failure on rank 1")
            yield batch

    cli.iter_image_batches = failing_batches
    sys.exit(cli.main(sys.argv[1:]))
    """
)


@pytest.mark.slow
def test_failed_rank_fails_run_without_results(evaluate_arguments, tmp_path):
    script = tmp_path / "failing_cli.py"
    script.write_text(FAILING_CLI)
    output = tmp_path / "results"
    # The ID set alone, in batches of 1: rank 1 gets several batches, and its second one raises.
    arguments = [*evaluate_arguments[:7], "--batch-size", "1", "--alphas", "0,1", "--output-dir", str(output)]
    completed = _run(_torchrun(tmp_path / "logs", str(script), *arguments))
    assert completed.returncode != 0
    for rank in (0, 1):
        stderr = _rank_logs(tmp_path / "logs", rank, "stderr")
        assert "The evaluation failed on rank 1 during the endpoint pass over set 'id'" in stderr, stderr[-2000:]
        assert "OSError: simulated read failure on rank 1" in stderr
    assert not output.exists() or not any(output.iterdir())


class _SecondHalf:
    """A stand-in state whose `split` keeps the second half of the items, as rank 1 of 2 would."""

    def split(self, items):
        return items[(len(items) + 1) // 2 :]


def test_dataset_shards_read_own_block():
    import datasets

    dataset = datasets.Dataset.from_dict({"value": list(range(11))})
    read = []

    def make_batches(subset):
        read.extend(subset["value"])
        for start in range(0, len(subset), 3):
            rows = list(range(start, min(start + 3, len(subset))))
            yield torch.tensor(rows, dtype=torch.float), torch.zeros(len(rows)), torch.tensor(rows)

    shards = dataset_shard_batches(make_batches, dataset, batch_size=3)
    batches = list(shards(_SecondHalf()))
    # 4 batches of 3 (the last one short); the second half is batches 2 and 3, rows 6 to 10.
    assert read == [6, 7, 8, 9, 10]
    assert [batch[2].tolist() for batch in batches] == [[6, 7, 8], [9, 10]]
    assert shards.num_examples(_SecondHalf()) == 5
    empty = dataset_shard_batches(make_batches, dataset.select([]), batch_size=3)
    assert list(empty(_SecondHalf())) == []
    assert empty.num_examples(_SecondHalf()) == 0


def test_single_process_state_is_transparent():
    state = DistributedState()
    tensors = {"values": torch.arange(6.0).reshape(3, 2)}
    assert torch.equal(state.gather_rows(tensors, "test")["values"], tensors["values"])
    assert state.broadcast_json({"a": [1.5]}, "test") == {"a": [1.5]}
    with pytest.raises(KeyError, match="unchanged"):
        state.run("test", lambda: (_ for _ in ()).throw(KeyError("unchanged")))


@pytest.mark.parametrize(
    ("environment", "warns"),
    [
        # What accelerate 1.16 sets for `accelerate launch --cpu --num_processes 2` and for one process.
        ({"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}, True),
        ({"ACCELERATE_USE_CPU": "True"}, False),
        ({}, False),
    ],
    ids=["cpu-two-requested", "cpu-one-requested", "plain"],
)
def test_single_cpu_launch_warns(monkeypatch, caplog, environment, warns):
    for name in ("ACCELERATE_USE_CPU", "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)

    with caplog.at_level("WARNING", logger="hf_dawin.distributed"):
        state = get_distributed_state()

    assert not state.is_distributed
    assert ("started this evaluation as a single process" in caplog.text) is warns

def test_failed_collective_raises_rank_lost():
    def closed_connection():
        raise RuntimeError("Connection closed by peer")

    with pytest.raises(RankLostError, match="Rank 0 lost contact .* during the mixture fit: Connection closed by peer"):
        DistributedState()._collective("the mixture fit", closed_connection)
    # With two processes the message names the other rank.
    pair = DistributedState(accelerator=SimpleNamespace(process_index=1, num_processes=2))
    with pytest.raises(RankLostError, match="Rank 1 lost contact with rank 0, the other evaluation process, during"):
        pair._collective("the mixture fit", closed_connection)
    with pytest.raises(RankLostError, match=r"by peer\. Rank 0 probably stopped"):
        pair._collective("the mixture fit", closed_connection)
    four = DistributedState(accelerator=SimpleNamespace(process_index=2, num_processes=4))
    with pytest.raises(RankLostError, match="Rank 2 lost contact with the other evaluation processes during"):
        four._collective("the mixture fit", closed_connection)


def _tensor_sets(pixel_values, labels, failing_rank=None):
    """The ID and shifted sets of a few random images, without shard_batches; batches raise on `failing_rank`."""

    def make(name, rows, in_distribution, batch_size):
        def batches():
            for position, start in enumerate(range(0, len(rows), batch_size)):
                if failing_rank is not None and position >= 2 and torch.distributed.get_rank() == failing_rank:
                    raise ValueError(f"simulated failure in set {name}")
                chunk = rows[start : start + batch_size]
                yield pixel_values[chunk], labels[chunk], torch.tensor(chunk) - rows[0]

        return EvaluationSet(name, batches, len(rows), in_distribution=in_distribution)

    return [make("id", list(range(0, 9)), True, 2), make("shift", list(range(9, 14)), False, 4)]


def _gloo_worker(rank: int, port: int, pair_dirs, pixel_values, labels, output_dir) -> None:
    """One rank of a two-process gloo group: evaluate the tensor sets, then sets that fail on rank 1."""
    import torch.distributed as dist

    from hf_dawin import DaWinCLIPModel

    from .conftest import TINY_CLASS_NAMES, TINY_TEMPLATES

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model = DaWinCLIPModel.from_pretrained_pair(
            pair_dirs[0], pair_dirs[1], class_names=TINY_CLASS_NAMES, templates=TINY_TEMPLATES
        )
        settings = EvaluationSettings(alphas=(0.3,), progress=False)
        record = {"results": evaluate_pair(model, _tensor_sets(pixel_values, labels), settings)}
        state = get_distributed_state()
        record["world_size"] = state.world_size
        record["split"] = list(state.split(range(5)))
        record["results"].pop("coefficients")
        try:
            evaluate_pair(model, _tensor_sets(pixel_values, labels, failing_rank=1), settings)
        except RankFailedError as error:
            record["error"] = {"type": type(error).__name__, "message": str(error), "failures": error.failures}
        (output_dir / f"rank{rank}.json").write_text(json.dumps(record, sort_keys=True))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_evaluate_pair_in_gloo_group(tiny_pair_dirs, tmp_path):
    """The library API in a process group of two, without a launcher: ranks keep every second batch."""
    from hf_dawin import DaWinCLIPModel

    from .conftest import TINY_CLASS_NAMES, TINY_TEMPLATES

    generator = torch.Generator().manual_seed(3)
    pixel_values = torch.randn(14, 3, 16, 16, generator=generator)
    labels = torch.randint(0, 4, (14,), generator=generator)
    # The workers use one thread; so does this reference run, heads included, for identical arithmetic.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = DaWinCLIPModel.from_pretrained_pair(
            tiny_pair_dirs[0], tiny_pair_dirs[1], class_names=TINY_CLASS_NAMES, templates=TINY_TEMPLATES
        )
        expected = evaluate_pair(
            model, _tensor_sets(pixel_values, labels), EvaluationSettings(alphas=(0.3,), progress=False)
        )
    finally:
        torch.set_num_threads(threads)
    expected.pop("coefficients")

    context = torch.multiprocessing.get_context("spawn")
    port = _free_port()
    arguments = (port, tuple(str(path) for path in tiny_pair_dirs), pixel_values, labels, tmp_path)
    processes = [context.Process(target=_gloo_worker, args=(rank, *arguments)) for rank in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=300)
        assert process.exitcode == 0

    for rank in range(2):
        record = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert record["results"] == json.loads(json.dumps(expected, sort_keys=True))
        assert record["world_size"] == 2
        assert record["split"] == [[0, 1, 2], [3, 4]][rank]
        assert record["error"]["type"] == "RankFailedError"
        assert record["error"]["failures"] == {"1": "ValueError: simulated failure in set id"}
        assert "failed on rank 1 during the endpoint pass over set 'id'" in record["error"]["message"]
