"""Train a byte-level BASED language model (based.nn.BasedLM) on a text file.

The default data is data/tinyshakespeare.txt; the LAST 10% of its bytes (from
``int(0.9 * n)`` on) are held out for validation and never trained on. Runs on one CUDA
GPU (bf16 autocast, fused AdamW, optional torch.compile) or on CPU (smoke tests).

    # the real run (one H200, ~8 minutes of training at most per invocation)
    python training/train_shakespeare.py --device cuda --out runs/shakespeare --max-minutes 7.5
    # continue it if the time limit stopped it before the planned steps
    python training/train_shakespeare.py --device cuda --out runs/shakespeare --max-minutes 7.5 --resume
    # a CPU smoke run (seconds)
    python training/train_shakespeare.py --preset smoke --device cpu --out /tmp/based-smoke

Writes into --out:
    model.safetensors, config.json   weights (float16 by default) with the best validation
                                     loss seen on the eval slice; BasedLM.from_pretrained(out)
    checkpoint.pt                    fp32 weights + optimizer + step + RNG states (for --resume)
    training_log.json                command lines, steps, wall time, final train/val losses,
                                     torch version, device, the loss history

Validation during training uses a fixed slice (the first --eval-bytes bytes of the held-out
split); the saved weights are the ones with the lowest loss on that slice. The final losses
in training_log.json are measured on the saved weights, in float32 without autocast, with
``based.nn.evaluate_loss`` (non-overlapping windows of --seq-len): ``val_loss`` over the
whole held-out split, ``val_loss_after_slice`` over the held-out bytes the selection never
saw, ``train_loss`` over the first len(held-out) bytes of the training split.

On --resume the model config and the schedule (steps, lr, batch, ...) come from the
checkpoint; --max-minutes, --stop-after, --device, --dtype, --compile and the logging
cadence come from the command line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:
    import based
except ImportError:  # run from a source tree that was built in place but not installed
    sys.path.insert(0, REPO)
    import based
from based.nn import BasedConfig, BasedLM, evaluate_loss  # noqa: E402

DEFAULT_DATA = os.path.join(REPO, "data", "tinyshakespeare.txt")
CHECKPOINT = "checkpoint.pt"
LOG = "training_log.json"
MAX_WEIGHT_BYTES = 10 * 1000 * 1000

# Model and schedule per preset. "h200": ~4.1M parameters (8.3 MB in float16), 2500 steps of
# 64 x 256 bytes = 41M tokens (~40 passes over the 1.0 MB training split) with dropout 0.25: on an
# H200 a 5000-step, dropout-0.15 schedule overfit from step ~750 on (training/README.md has both
# runs); this one is the bundled model's. "smoke": seconds on a CPU.
PRESETS = {
    "h200": {
        "model": dict(d_model=256, layers=["conv", "linear", "window", "conv", "linear", "window"],
                      mlp_hidden=512, linear_heads=4, linear_feature_dim=16, linear_head_dim=64,
                      window=128, window_heads=4, window_kv_heads=4, window_head_dim=64,
                      conv_inner=512, dropout=0.25),
        "train": dict(seq_len=256, batch_size=64, steps=2500, lr=1e-3, min_lr=1e-4, warmup=200,
                      weight_decay=0.1, grad_clip=1.0, eval_every=250, eval_bytes=65536, log_every=50,
                      ckpt_minutes=2.0, seed=1337),
    },
    "smoke": {
        "model": dict(d_model=64, layers=["conv", "linear", "window"], mlp_hidden=128, linear_heads=2,
                      linear_feature_dim=16, linear_head_dim=32, window=16, window_heads=2, window_kv_heads=1,
                      window_head_dim=32, conv_inner=128, dropout=0.0),
        "train": dict(seq_len=64, batch_size=8, steps=150, lr=3e-3, min_lr=3e-4, warmup=10, weight_decay=0.1,
                      grad_clip=1.0, eval_every=50, eval_bytes=4096, log_every=25, ckpt_minutes=2.0, seed=1337),
    },
}
TRAIN_KEYS = tuple(PRESETS["h200"]["train"])
RUNTIME_KEYS = ("eval_every", "eval_bytes", "log_every", "ckpt_minutes")     # may change on --resume


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (weights, checkpoint, log)")
    p.add_argument("--data", default=DEFAULT_DATA, help="training text file (bytes)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="h200", help="model + schedule preset")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                   help="autocast dtype for training (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="hard wall-clock budget of the training loop; stops cleanly, saves, evaluates")
    p.add_argument("--stop-after", type=int, default=None, help="stop this invocation after N more steps")
    p.add_argument("--save-dtype", choices=["float16", "bfloat16"], default="float16",
                   help="dtype of model.safetensors")
    p.add_argument("--final-eval-bytes", type=int, default=None,
                   help="evaluate the final losses on this many bytes only (default: the whole split)")
    model = p.add_argument_group("model (override the preset)")
    model.add_argument("--d-model", type=int)
    model.add_argument("--layers", help="comma-separated mixers, e.g. conv,linear,window")
    model.add_argument("--window", type=int)
    model.add_argument("--dropout", type=float)
    train = p.add_argument_group("schedule (override the preset)")
    for key in TRAIN_KEYS:
        kind = float if key in ("lr", "min_lr", "weight_decay", "grad_clip", "ckpt_minutes") else int
        train.add_argument("--" + key.replace("_", "-"), type=kind, dest=key)
    return p


def resolve(args) -> tuple[BasedConfig, dict]:
    preset = PRESETS[args.preset]
    model = dict(preset["model"])
    for key in ("d_model", "window", "dropout"):
        if getattr(args, key) is not None:
            model[key] = getattr(args, key)
    if args.layers is not None:
        model["layers"] = [s.strip() for s in args.layers.split(",") if s.strip()]
    if args.d_model is not None:            # widths that follow d_model in the preset
        for key in ("mlp_hidden", "conv_inner", "linear_head_dim", "window_head_dim"):
            model.pop(key, None)
    train = dict(preset["train"])
    for key in TRAIN_KEYS:
        if getattr(args, key) is not None:
            train[key] = getattr(args, key)
    return BasedConfig(**model), train


def lr_at(step: int, s: dict) -> float:
    """Linear warm-up to lr, then cosine decay to min_lr at the last step."""
    if step < s["warmup"]:
        return s["lr"] * (step + 1) / s["warmup"]
    progress = min(1.0, (step - s["warmup"]) / max(1, s["steps"] - s["warmup"]))
    return s["min_lr"] + 0.5 * (s["lr"] - s["min_lr"]) * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model, s: dict, device: torch.device) -> torch.optim.Optimizer:
    # weight decay on matrices and conv filters, not on norms, biases or the embedding
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and not name.startswith("embed.") else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": s["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=s["lr"], betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")


def load_bytes(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    with open(path, "rb") as f:
        data = torch.from_numpy(np.frombuffer(f.read(), dtype=np.uint8).copy())
    split = int(0.9 * data.numel())
    return data[:split], data[split:]


def save_checkpoint(path: str, payload: dict) -> None:
    tmp = path + ".tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)                   # a kill mid-write never leaves a torn checkpoint


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    command = shlex.join(["python", os.path.relpath(os.path.abspath(__file__))] + argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    amp = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    amp_dtype = torch.bfloat16 if amp == "bf16" else None
    os.makedirs(args.out, exist_ok=True)
    ckpt_path = os.path.join(args.out, CHECKPOINT)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    ckpt = None
    if args.resume:
        if not os.path.exists(ckpt_path):
            raise SystemExit(f"--resume: no checkpoint at {ckpt_path}")
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        config, s = BasedConfig.from_dict(ckpt["config"]), dict(ckpt["settings"])
        _, cli = resolve(args)
        for key in RUNTIME_KEYS:                          # cadence may change between invocations
            if getattr(args, key) is not None:
                s[key] = cli[key]
    else:
        config, s = resolve(args)

    torch.manual_seed(s["seed"])
    sampler = torch.Generator().manual_seed(s["seed"])
    train_bytes, val_bytes = load_bytes(args.data)
    if train_bytes.numel() <= s["seq_len"] + 1 or val_bytes.numel() < 2:
        raise SystemExit(f"{args.data} is too small for seq_len {s['seq_len']}")
    train_data = train_bytes.to(device)
    offsets = torch.arange(s["seq_len"] + 1, device=device)

    model = BasedLM(config).to(device)
    optimizer = make_optimizer(model, s, device)
    step, best, history, invocations, train_seconds = 0, None, [], [], 0.0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step, best, history = ckpt["step"], ckpt["best"], ckpt["history"]
        invocations, train_seconds = ckpt["invocations"], ckpt["train_seconds"]
        sampler.set_state(ckpt["sampler_rng"])
        torch.set_rng_state(ckpt["torch_rng"])
        if device.type == "cuda" and ckpt.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(ckpt["cuda_rng"], device)
    train_model = torch.compile(model) if args.compile else model
    n_params = model.num_parameters()
    print(f"based.nn.BasedLM: {n_params:,} parameters, layers {config.layers}, device {device_description(device)}, "
          f"autocast {amp}, torch {torch.__version__}", flush=True)
    print(f"data {args.data}: {train_bytes.numel():,} train bytes, {val_bytes.numel():,} held-out bytes; "
          f"{'resuming at step ' + str(step) if ckpt else 'fresh start'}, {s['steps']} steps planned", flush=True)

    def autocast():
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp_dtype is not None)

    def checkpoint_payload():
        return {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
            "config": config.to_dict(), "settings": s, "best": best, "history": history,
            "invocations": invocations + [this_run()], "train_seconds": train_seconds + loop_seconds(),
            "sampler_rng": sampler.get_state(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        }

    def save_weights():
        model.save_pretrained(args.out, dtype=getattr(torch, args.save_dtype))

    start_step, loop_start = step, time.perf_counter()
    stopped_by = "steps"

    def loop_seconds():
        return time.perf_counter() - loop_start

    def this_run():
        return {"command": command, "start_step": start_step, "end_step": step, "seconds": round(loop_seconds(), 2),
                "stopped_by": stopped_by, "device": device_description(device)}

    budget = None if args.max_minutes is None else 60.0 * args.max_minutes
    last_ckpt = time.perf_counter()
    loss_sum, loss_count = torch.zeros((), device=device), 0
    log_time, log_step = time.perf_counter(), step
    model.train()
    while step < s["steps"]:
        if budget is not None and loop_seconds() >= budget:
            stopped_by = "max-minutes"
            break
        if args.stop_after is not None and step - start_step >= args.stop_after:
            stopped_by = "stop-after"
            break
        lr = lr_at(step, s)
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, train_data.numel() - s["seq_len"], (s["batch_size"],), generator=sampler)
        batch = train_data[starts.to(device, non_blocking=True)[:, None] + offsets].long()   # (B, T + 1)
        with autocast():
            logits = train_model(batch[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s["grad_clip"])
        optimizer.step()
        step += 1
        loss_sum += loss.detach()
        loss_count += 1

        evaluate = step % s["eval_every"] == 0 or step == s["steps"]
        if evaluate or step % s["log_every"] == 0:
            train_loss = float(loss_sum) / loss_count              # synchronises
            now = time.perf_counter()
            tok_s = (step - log_step) * s["batch_size"] * s["seq_len"] / (now - log_time)
            entry = {"step": step, "train_loss": round(train_loss, 4), "lr": lr, "tokens_per_s": round(tok_s),
                     "elapsed_s": round(train_seconds + loop_seconds(), 1)}
            if evaluate:
                val = evaluate_loss(model, val_bytes, s["seq_len"], batch_size=s["batch_size"],
                                    max_bytes=s["eval_bytes"], autocast_dtype=amp_dtype)
                entry["val_loss_slice"] = round(val, 4)
                if best is None or val < best["val_loss_slice"]:
                    best = {"step": step, "val_loss_slice": val}
                    save_weights()
            history.append(entry)
            print(" | ".join(f"{k} {v:.3g}" if isinstance(v, float) and k == "lr" else f"{k} {v}"
                             for k, v in entry.items()), flush=True)
            loss_sum, loss_count = torch.zeros((), device=device), 0
            log_time, log_step = time.perf_counter(), step
        if time.perf_counter() - last_ckpt >= 60.0 * s["ckpt_minutes"]:
            save_checkpoint(ckpt_path, checkpoint_payload())
            last_ckpt = time.perf_counter()

    if best is None:                           # stopped before the first evaluation
        save_weights()
        best = {"step": step, "val_loss_slice": None}
    save_checkpoint(ckpt_path, checkpoint_payload())
    run = this_run()
    total_seconds = train_seconds + loop_seconds()
    print(f"stopped by {stopped_by} at step {step}/{s['steps']} after {total_seconds:.1f} s of training; "
          f"evaluating the saved weights (step {best['step']})", flush=True)

    if device.type == "cuda":                # the recorded losses are plain float32 math
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    saved = BasedLM.from_pretrained(args.out, device=device)
    n_eval = args.final_eval_bytes
    val_eval = val_bytes if n_eval is None else val_bytes[:n_eval]
    final = {
        "weights_step": best["step"],
        "eval_seq_len": s["seq_len"],
        "val_bytes": int(val_eval.numel()),
        "val_loss": evaluate_loss(saved, val_eval, s["seq_len"], batch_size=s["batch_size"]),
        "train_bytes": int(val_eval.numel()),
        "train_loss": evaluate_loss(saved, train_bytes[: val_eval.numel()], s["seq_len"],
                                    batch_size=s["batch_size"]),
        "train_loss_last_log": next((h["train_loss"] for h in reversed(history)), None),
    }
    if val_eval.numel() > s["eval_bytes"] + 1:
        final["val_loss_after_slice"] = evaluate_loss(saved, val_eval[s["eval_bytes"]:], s["seq_len"],
                                                      batch_size=s["batch_size"])
    weights_path = os.path.join(args.out, "model.safetensors")
    log = {
        "command": command,
        "commands": [inv["command"] for inv in invocations] + [command],
        "completed": step >= s["steps"],
        "steps": step,
        "planned_steps": s["steps"],
        "train_seconds": round(total_seconds, 2),
        "invocations": invocations + [run],
        "final": final,
        "weights": {"path": "model.safetensors", "dtype": args.save_dtype, "bytes": os.path.getsize(weights_path),
                    "step": best["step"], "selected_by": "lowest val_loss_slice (first eval_bytes of held-out)"},
        "parameters": n_params,
        "config": config.to_dict(),
        "settings": s,
        "data": {"path": os.path.relpath(os.path.abspath(args.data), REPO), "train_bytes": int(train_bytes.numel()),
                 "val_bytes": int(val_bytes.numel()), "split": "last 10% held out: bytes [int(0.9 * n), n)"},
        "torch_version": torch.__version__,
        "based_version": based.__version__,
        "python": platform.python_version(),
        "device": device_description(device),
        "autocast": amp,
        "compile": bool(args.compile),
        "history": history,
    }
    with open(os.path.join(args.out, LOG), "w", encoding="utf-8") as f:
        json.dump(log, f, indent=2)
    print(f"final (weights of step {best['step']}): val_loss {final['val_loss']:.4f} on {final['val_bytes']:,} "
          f"held-out bytes, train_loss {final['train_loss']:.4f}; weights {log['weights']['bytes']:,} bytes",
          flush=True)
    if log["weights"]["bytes"] > MAX_WEIGHT_BYTES:
        print(f"warning: {weights_path} is over {MAX_WEIGHT_BYTES:,} bytes", file=sys.stderr)
    return log


if __name__ == "__main__":
    main()
