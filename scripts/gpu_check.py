"""Check the client's model, train loop and eval loop on a CUDA GPU in every precision mode.

For each ``precision`` run-config value (fp32, bf16-autocast, bf16, 4bit) this builds the
LoRA model on the GPU the way a client does, trains with the shared train loop, scores with
the shared eval loop, and checks the adapter a client would send: it starts equal to the
federation's θ⁰, ends float32, finite and changed, with the same names and shapes in every
mode (so clients of different precision can share one federation). It records step time and
peak GPU memory per mode, with ratios to fp32.

The base model is a random Llama of configurable size with the tiny model's byte-level
tokenizer: no download is needed, and what is measured is the code path and its cost,
not the answers.

    python scripts/gpu_check.py --out outputs/gpu-check [--hidden 2048 --layers 16]

Writes gpu_check.json and gpu_check.md to --out; exits 1 if a check failed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, LlamaForCausalLM

from fedbilevel.client.evaluate import evaluate_adapter
from fedbilevel.client.train import TextCodec, train_adapter
from fedbilevel.data.synthetic import make_client_data
from fedbilevel.models.adapter import build_lora_model, get_adapter_arrays, initial_adapter_arrays
from fedbilevel.models.settings import PRECISIONS, LoraSettings
from fedbilevel.models.zoo import TINY_MODEL, load_tokenizer, resolve_model_source

LORA = LoraSettings(r=8, alpha=16, dropout=0.0, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))


def build_random_llama(folder: Path, *, hidden: int, layers: int) -> None:
    """A random Llama of the given width and depth with the tiny model's tokenizer, saved to ``folder``."""
    tiny = resolve_model_source(TINY_MODEL)
    config = AutoConfig.from_pretrained(tiny)
    heads = max(hidden // 64, 1)
    config.update(
        {
            "hidden_size": hidden,
            "intermediate_size": 4 * hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": max(heads // 4, 1),
        }
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    load_tokenizer(TINY_MODEL).save_pretrained(folder)


def check_mode(
    model_path: str, precision: str, *, steps: int, initial: dict[str, np.ndarray], device: torch.device
) -> dict:
    """Build, train and evaluate in one precision; the measurements and the failed checks."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    model = build_lora_model(model_path, LORA, seed=0, precision=precision, device=device)
    build_seconds = time.perf_counter() - started
    memory_model = torch.cuda.max_memory_allocated() / 2**20
    tokenizer = load_tokenizer(model_path)
    train, test = make_client_data(0, 8, seed=0, num_train=64, num_test=16)
    before = get_adapter_arrays(model)
    common = {"batch_size": 8, "learning_rate": 1e-3, "bf16_autocast": precision != "fp32", "device": device}
    codec = TextCodec(tokenizer, max_seq_len=128)
    train_adapter(model, codec, train, steps=2, seed=0, **common)  # warm-up: kernels, allocator
    torch.cuda.synchronize()
    timed = train_adapter(model, codec, train, steps=steps, seed=1, **common)
    torch.cuda.synchronize()
    scores = evaluate_adapter(
        model, tokenizer, test, batch_size=8, max_new_tokens=8, bf16_autocast=common["bf16_autocast"], device=device
    )
    after = get_adapter_arrays(model)
    failed = []
    if set(before) != set(initial) or any(before[k].shape != initial[k].shape for k in initial):
        failed.append("adapter names or shapes differ from the federation's θ⁰")
    elif not all(np.array_equal(before[k], initial[k]) for k in initial):
        failed.append("adapter does not start at θ⁰")
    if any(a.dtype != np.float32 for a in after.values()):
        failed.append("adapter is not float32")
    if not all(np.all(np.isfinite(a)) for a in after.values()):
        failed.append("adapter has NaN or Inf")
    if all(np.array_equal(after[k], before[k]) for k in after):
        failed.append("training did not change the adapter")
    if not np.isfinite(timed.loss):
        failed.append(f"loss {timed.loss}")
    if len(scores["items-exact_match"]) != len(test):
        failed.append("not every test item was scored")
    return {
        "precision": precision,
        "build_seconds": build_seconds,
        "step_seconds": timed.seconds / steps,
        "loss_mean": timed.loss,
        "loss_last": timed.last_loss,
        "peak_memory_model_mib": memory_model,
        "peak_memory_train_mib": torch.cuda.max_memory_allocated() / 2**20,
        "eval_exact_match": scores["exact_match"],
        "failed": failed,
    }


def markdown(rows: list[dict], header: dict) -> str:
    base = next((r for r in rows if r["precision"] == "fp32" and "error" not in r), None)
    lines = [
        f"GPU check on {header['device']} (torch {header['torch']}, bitsandbytes {header['bitsandbytes']}); "
        f"random Llama, hidden {header['hidden']}, {header['layers']} layers, "
        f"{header['parameters'] / 1e6:.0f} M parameters; "
        f"LoRA r 8 on q,k,v,o; batch 8 × 128 tokens.",
        "",
        "| precision | checks | step ms | × fp32 | peak MiB (model) | peak MiB (training) | × fp32 |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['precision']} | error: {row['error']} | | | | | |")
            continue
        step_ratio = f"{row['step_seconds'] / base['step_seconds']:.2f}" if base else "–"
        memory_ratio = f"{row['peak_memory_train_mib'] / base['peak_memory_train_mib']:.2f}" if base else "–"
        checks = "pass" if not row["failed"] else "FAIL: " + "; ".join(row["failed"])
        lines.append(
            f"| {row['precision']} | {checks} | {1000 * row['step_seconds']:.1f} | {step_ratio} | "
            f"{row['peak_memory_model_mib']:.0f} | {row['peak_memory_train_mib']:.0f} | {memory_ratio} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--hidden", type=int, default=2048, help="hidden size of the random Llama (default: 2048)")
    parser.add_argument("--layers", type=int, default=16, help="its number of layers (default: 16)")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per mode (default: 20)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device is visible")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        build_random_llama(Path(folder), hidden=args.hidden, layers=args.layers)
        initial = initial_adapter_arrays(folder, LORA, seed=0)
        rows = []
        for precision in PRECISIONS:
            print(f"gpu_check: {precision} ...", flush=True)
            try:
                rows.append(
                    check_mode(folder, precision, steps=args.steps, initial=initial, device=torch.device("cuda"))
                )
            except Exception as error:  # report every mode, even after one breaks
                traceback.print_exc()
                rows.append({"precision": precision, "error": f"{type(error).__name__}: {error}".splitlines()[0]})
            print(f"gpu_check: {rows[-1]}", flush=True)
        parameters = sum(p.numel() for p in LlamaForCausalLM.from_pretrained(folder).parameters())
    try:
        bnb = importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        bnb = "not installed"
    header = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "bitsandbytes": bnb,
        "hidden": args.hidden,
        "layers": args.layers,
        "parameters": parameters,
        "command": sys.argv,
    }
    (args.out / "gpu_check.json").write_text(json.dumps({**header, "modes": rows}, indent=2))
    table = markdown(rows, header)
    (args.out / "gpu_check.md").write_text(table)
    print(table)
    return 1 if any("error" in r or r["failed"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
