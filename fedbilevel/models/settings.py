"""Run-config options of the base model and of its LoRA adapter (pure Python, no torch)."""

from __future__ import annotations

from dataclasses import dataclass

from fedbilevel.options import choice, device, integer, name_list, number, option, text, validate

DEFAULT_MODEL = "smollm2-135m-instruct"
PRECISIONS = ("fp32", "bf16-autocast", "bf16", "4bit")


@dataclass(frozen=True)
class ModelSettings:
    """Which base model a client loads, where, and in which precision."""

    name: str = option("model-name", DEFAULT_MODEL, text(empty_ok=False), "embedded alias, HF model id or local folder")
    device: str = option("device", "auto", device, "`auto` (CUDA if visible, else CPU), `cpu`, `cuda`, `cuda:N`")
    precision: str = option(
        "precision",
        "fp32",
        choice(PRECISIONS),
        "base-model weights and compute: `fp32`; `bf16-autocast` (fp32 weights, bf16 compute); `bf16` (bf16 weights: "
        "half the memory); `4bit` (NF4 weights through bitsandbytes, QLoRA-style: a third of the memory; CUDA only, "
        "`pip install bitsandbytes`). Adapters are float32 in every mode, so clients of different precision can "
        "share a federation. On CPUs without native bf16 every mode but `fp32` is very slow",
    )
    client_threads: int = option(
        "client-threads", 1, integer(0), "torch threads per client process (0 = torch's default)"
    )

    def __post_init__(self) -> None:
        validate(self)

    @property
    def bf16_compute(self) -> bool:
        """Whether forward passes run under bf16 autocast (every precision but ``fp32``)."""
        return self.precision != "fp32"


@dataclass(frozen=True)
class LoraSettings:
    """Hyper-parameters of the LoRA adapters (Hu et al., ICLR 2022).

    Attributes
    ----------
    r : int
        Rank of the low-rank update.
    alpha : int
        LoRA scaling numerator; the update is scaled by ``alpha / r``.
    dropout : float
        Dropout applied to the adapter input during training.
    target_modules : tuple of str
        Names of the linear layers that receive an adapter.
    num_labels : int
        Image classifiers: classes of the head trained with the adapter; 0 keeps the
        model's own head, another number gives a new head (initialised from a fixed seed,
        so every client and the server agree).
    """

    r: int = option("lora-r", 8, integer(1), "LoRA rank")
    alpha: int = option("lora-alpha", 16, integer(1), "LoRA scaling numerator (the update is scaled by alpha / r)")
    dropout: float = option("lora-dropout", 0.05, number(0.0, low_open=False, high=1.0), "dropout on the adapter input")
    target_modules: tuple[str, ...] = option(
        "lora-target-modules", ("q_proj", "k_proj", "v_proj", "o_proj"), name_list, "modules that get LoRA"
    )
    num_labels: int = option(
        "num-labels",
        0,
        integer(0),
        "image classifiers: classes of the trained head; 0 keeps the model's head, another number gives a new one "
        "(drawn from a fixed seed, the same on every client)",
    )

    def __post_init__(self) -> None:
        validate(self)
