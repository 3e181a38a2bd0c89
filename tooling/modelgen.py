"""Create a small Llama-architecture model folder offline: random weights, a BPE tokenizer trained
on local text, and the usual Hugging Face files (config.json, tokenizer files, safetensors).

Nothing is downloaded. The model speaks nonsense but exercises the real loading and inference
code paths of vLLM; its size is read from the weights it writes.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from shared.model_folder import is_model_folder

log = logging.getLogger(__name__)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]


@dataclass(frozen=True)
class TinyLlamaShape:
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 2048

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def parameters(self) -> int:
        h, i, kv = self.hidden_size, self.intermediate_size, self.num_key_value_heads * self.head_dim
        per_layer = 2 * h * h + 2 * kv * h + 3 * i * h + 2 * h
        return 2 * self.vocab_size * h + self.num_hidden_layers * per_layer + h


# Named sizes for `warmserve models make-tiny --size ...`: a fast one for tests, one like the
# ~300M model whose CPU timings docs/design.md ("On a CPU") reports.
SIZES: dict[str, TinyLlamaShape] = {
    "5m": TinyLlamaShape(),
    "300m": TinyLlamaShape(hidden_size=1024, intermediate_size=2816, num_hidden_layers=26,
                           num_attention_heads=16, num_key_value_heads=8),
}


def _corpus(limit_chars: int = 3_000_000):
    """Training text every Python install has: the docstrings of the standard library's sources
    (read, never imported, so no module's import side effects run)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    seen = 0
    for path in sorted(stdlib.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    yield doc
                    seen += len(doc)
        if seen >= limit_chars:
            return


def train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok


def _weights(shape: TinyLlamaShape, vocab: int, seed: int):
    """Random weights, tensor by tensor (bfloat16 through torch when it is installed, else float32)."""
    rng = np.random.default_rng(seed)
    h, i, d = shape.hidden_size, shape.intermediate_size, shape.head_dim
    kv = shape.num_key_value_heads * d
    try:
        import torch
    except ImportError:
        torch = None

    def cast(a: np.ndarray):
        return torch.from_numpy(a).to(torch.bfloat16) if torch is not None else a

    def rand(*dims):
        return cast(rng.standard_normal(dims, dtype=np.float32) * np.float32(0.02))

    def ones(n):
        return cast(np.ones(n, np.float32))

    w = {"model.embed_tokens.weight": rand(vocab, h), "model.norm.weight": ones(h), "lm_head.weight": rand(vocab, h)}
    for layer in range(shape.num_hidden_layers):
        p = f"model.layers.{layer}."
        w |= {
            p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(kv, h),
            p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, h),
            p + "mlp.gate_proj.weight": rand(i, h), p + "mlp.up_proj.weight": rand(i, h),
            p + "mlp.down_proj.weight": rand(h, i),
            p + "input_layernorm.weight": ones(h), p + "post_attention_layernorm.weight": ones(h),
        }
    return w, ("bfloat16" if torch is not None else "float32")


def create_tiny_llama(path: str | os.PathLike, shape: TinyLlamaShape = TinyLlamaShape(), seed: int = 0) -> Path:
    """Write a complete model folder at ``path`` (replacing nothing that is already complete)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no "PyTorch was not found" notice
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    out = Path(path)
    if is_model_folder(out):
        return out
    out.mkdir(parents=True, exist_ok=True)
    log.info("training a %d-token BPE tokenizer on local text", shape.vocab_size)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(shape.vocab_size), bos_token="<s>", eos_token="</s>",
        unk_token="<unk>", pad_token="<pad>", model_max_length=shape.max_position_embeddings,
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out)
    vocab = len(tok)
    weights, dtype = _weights(shape, vocab, seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers, num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads, max_position_embeddings=shape.max_position_embeddings,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False, dtype=dtype, architectures=["LlamaForCausalLM"],
    )
    config.save_pretrained(out)
    log.info("writing %.0fM random %s weights (seed %d)", shape.parameters / 1e6, dtype, seed)
    if dtype == "bfloat16":
        from safetensors.torch import save_file
    else:
        from safetensors.numpy import save_file
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "warmserve.json").write_text(json.dumps({"shape": asdict(shape), "seed": seed}, indent=2))
    return out
