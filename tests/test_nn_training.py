"""training/train_shakespeare.py end to end on CPU: a 20-step smoke run whose loss falls, its
files, and a run stopped and resumed that ends bit-for-bit where an unbroken run does."""

import importlib.util
import json
import math
import os

import pytest

torch = pytest.importorskip("torch")
import based.nn as bnn  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "training", "train_shakespeare.py")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: a second OpenMP thread only adds synchronisation, and on a
    loaded machine its spin-waits make a run ~20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def train():
    spec = importlib.util.spec_from_file_location("train_shakespeare", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "shakespeare_head.txt"
    with open(os.path.join(REPO, "data", "tinyshakespeare.txt"), "rb") as f:
        path.write_bytes(f.read(40_000))                # 36,000 train bytes, 4,000 held out
    return str(path)


def smoke_args(out, data, *extra):
    return ["--preset", "smoke", "--device", "cpu", "--out", str(out), "--data", data, "--steps", "20",
            "--eval-every", "10", "--log-every", "5", "--eval-bytes", "1024", "--batch-size", "4", "--seq-len", "32",
            "--dropout", "0.1", *extra]


def test_smoke_run_learns_and_writes_its_files(train, text, tmp_path):
    log = train.main(smoke_args(tmp_path, text))
    assert log["completed"] and log["steps"] == 20 and log["invocations"][0]["stopped_by"] == "steps"
    losses = [h["train_loss"] for h in log["history"]]
    assert losses[0] > losses[-1] + 1.0, losses               # from ~ln(256) = 5.5 to well below
    assert log["final"]["val_loss"] < math.log(256) - 1.0
    assert log["final"]["val_bytes"] == 4000 and log["data"]["train_bytes"] == 36000
    assert "--preset smoke" in log["command"] and log["torch_version"] == torch.__version__
    assert log["device"].startswith("cpu")
    assert json.loads((tmp_path / "training_log.json").read_text())["steps"] == 20
    model = bnn.BasedLM.from_pretrained(tmp_path)
    assert model.config.layers == ["conv", "linear", "window"]
    assert log["weights"]["bytes"] == os.path.getsize(tmp_path / "model.safetensors")
    # the recorded val_loss is evaluate_loss of the saved weights, reproducible from the files
    with open(text, "rb") as f:
        held_out = f.read()[36000:]
    assert bnn.evaluate_loss(model, held_out, log["settings"]["seq_len"]) == pytest.approx(
        log["final"]["val_loss"], rel=1e-6)


def test_resume_continues_exactly(train, text, tmp_path):
    train.main(smoke_args(tmp_path / "straight", text))
    first = train.main(smoke_args(tmp_path / "split", text, "--stop-after", "12"))
    assert not first["completed"] and first["steps"] == 12
    assert first["invocations"][-1]["stopped_by"] == "stop-after"
    second = train.main(smoke_args(tmp_path / "split", text, "--resume"))
    assert second["completed"] and second["steps"] == 20 and len(second["commands"]) == 2
    assert [inv["end_step"] for inv in second["invocations"]] == [12, 20]
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    for name, t in a["model"].items():
        assert torch.equal(t, b["model"][name]), name
    assert second["final"]["val_loss"] == pytest.approx(
        json.loads((tmp_path / "straight" / "training_log.json").read_text())["final"]["val_loss"], rel=1e-12)


def test_max_minutes_stops_cleanly(train, text, tmp_path):
    log = train.main(smoke_args(tmp_path, text, "--max-minutes", "0"))
    assert log["steps"] == 0 and not log["completed"]
    assert log["invocations"][0]["stopped_by"] == "max-minutes"
    assert os.path.exists(tmp_path / "checkpoint.pt") and os.path.exists(tmp_path / "model.safetensors")


def test_resume_without_checkpoint_fails(train, text, tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint"):
        train.main(smoke_args(tmp_path, text, "--resume"))
