"""``gpt2_mini``: a small decoder-only transformer language model (ELO's GPT-2 task).

A GPT-2-style model (``tasks.models.GPT``: layers, width, heads and context configurable)
trained on next-token prediction over a character- or byte-tokenised corpus
(``tasks.data.load_text``). ELO (Table 1, "GPT2-mini") trained it on FineWeb-10B, which is not
available here; the default ``dataset="tiny_shakespeare"`` (Karpathy's char-rnn corpus,
prepared once with ``python scripts/prepare_data.py --dataset=tiny_shakespeare
--source=FILE``) is the named stand-in, and building the family without it prepared fails at
once with that command. ``dataset="generated"`` (a small corpus from a fixed grammar,
embedded) runs on a CPU in seconds for smoke tests; ``"text:FILE"`` reads any local text file.
Loss: mean next-token cross-entropy (nats per token) over every position of a window of
``context`` tokens. Windows start at uniformly random offsets, drawn inside jit from the
device-resident token array that a compiled loop passes in (``tasks.base.bind_data``).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import optax

import tasks
from tasks import catalogue, models
from tasks import data as data_lib
from tasks.base import SPLITS, check_split
from tasks.errors import DatasetNotPreparedError


@tasks.register("gpt2_mini")
@dataclasses.dataclass(frozen=True)
class GPT2Mini:
    """Decoder-only transformer LM; spec = {"seed": init seed}."""

    num_layers: int = 4
    width: int = 128
    num_heads: int = 4
    context: int = 64
    mlp_ratio: int = 4
    batch_size: int = 32
    dataset: str = "tiny_shakespeare"  # stands in for ELO's FineWeb-10B
    data_dir: str | None = None
    tokenizer: str = "char"
    # Arrays bound inside jit by `tasks.base.bind_data`; not part of the family's identity.
    bound_arrays: Any = dataclasses.field(default=None, compare=False, repr=False)
    name: ClassVar[str] = "gpt2_mini"

    def __post_init__(self):
        for field in ("num_layers", "width", "num_heads", "context", "mlp_ratio", "batch_size"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"gpt2_mini: {field} must be a positive int, got {value!r}")
        if self.width % self.num_heads:
            raise ValueError(
                f"gpt2_mini: width {self.width} must be divisible by num_heads {self.num_heads}"
            )
        if self.tokenizer not in data_lib.TOKENIZERS:
            raise ValueError(
                f"gpt2_mini: tokenizer must be one of {data_lib.TOKENIZERS}, got {self.tokenizer!r}"
            )
        try:  # before anything reads data or builds a model
            data_lib.require(self.dataset, self.data_dir)
        except DatasetNotPreparedError as e:
            raise data_lib.with_smoke_hint(e, self.name, catalogue.SMOKE_TEXT) from None
        for split in SPLITS:
            n = self.data.size(split)
            if n <= self.context:
                raise ValueError(
                    f"gpt2_mini: the {split} split of dataset {self.dataset!r} has {n} tokens, "
                    f"too few for windows of context={self.context} (+1 target); use a smaller "
                    "context or a larger corpus"
                )

    @property
    def data(self) -> data_lib.TextDataset:
        return data_lib.load_text(self.dataset, self.data_dir, tokenizer=self.tokenizer)

    @property
    def arrays(self) -> dict:
        """{split: {"tokens"}} device arrays (the bound ones inside a compiled loop)."""
        return self.data.splits if self.bound_arrays is None else self.bound_arrays

    def bind(self, arrays: dict) -> "GPT2Mini":
        bound = copy.copy(self)  # no __post_init__: options were checked when self was built
        object.__setattr__(bound, "bound_arrays", arrays)
        return bound

    @property
    def vocab_size(self) -> int:
        return self.data.vocab_size

    def module(self, vocab_size: int | None = None) -> models.GPT:
        return models.GPT(
            vocab_size=vocab_size or self.vocab_size,
            context=self.context,
            num_layers=self.num_layers,
            width=self.width,
            num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio,
        )

    def sample(self, key: jax.Array) -> dict:
        return {"seed": jax.random.randint(key, (), 0, jnp.iinfo(jnp.int32).max)}

    def init(self, spec: dict, key: jax.Array) -> dict:
        dummy = jnp.zeros((1, self.context), jnp.int32)
        return self.module().init(jax.random.fold_in(key, spec["seed"]), dummy)["params"]

    def loss(self, spec: dict, params: dict, batch: dict) -> tuple[jax.Array, dict]:
        tokens = batch["tokens"]
        logits = self.module().apply({"params": params}, tokens[:, :-1])
        targets = tokens[:, 1:]
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
        accuracy = jnp.mean(jnp.argmax(logits, -1) == targets)
        return loss, {"accuracy": accuracy}

    def batch(self, spec: dict, key: jax.Array, split: str) -> dict:
        """``{"tokens": int32 [batch_size, context + 1]}``: inputs and shifted targets."""
        check_split(split)
        tokens = self.arrays[split]["tokens"]
        starts = jax.random.randint(key, (self.batch_size,), 0, tokens.shape[0] - self.context)
        return {"tokens": tokens[starts[:, None] + jnp.arange(self.context + 1)]}

    def param_count(self, vocab_size: int | None = None) -> int:
        """Parameters for ``vocab_size`` (default: this corpus and tokenizer's)."""
        module = self.module(vocab_size)
        dummy = jnp.zeros((1, self.context), jnp.int32)
        params = jax.eval_shape(module.init, jax.random.PRNGKey(0), dummy)
        return sum(math.prod(p.shape) for p in jax.tree.leaves(params["params"]))
