"""Models: the built-in tiny Llama, loading and saving in Hugging Face format (or only the
architecture, on the meta device, for the processes that receive FSDP2 shards), SFT and sampling."""

from __future__ import annotations

import dataclasses
import math
import os
import shutil

import torch


@dataclasses.dataclass(frozen=True)
class LoadOptions:
    """How every model, config and tokenizer of a run is read (TRL's ModelConfig flags): the attention
    kernel the models run with (None: transformers' default) and whether a model's own code may run."""
    attn_implementation: str | None = None
    trust_remote_code: bool = False

    def config_kwargs(self) -> dict:
        # always explicit: left unset, transformers asks on the terminal before running a model's code
        # (once per load, and a run loads its models many times), where False refuses at once
        return {"trust_remote_code": self.trust_remote_code}

    def model_kwargs(self) -> dict:
        kw = self.config_kwargs()
        if self.attn_implementation:
            kw["attn_implementation"] = self.attn_implementation
        return kw


def tiny_llama_config(vocab_size: int, *, hidden_size: int = 96, num_layers: int = 2, max_len: int = 128):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=hidden_size * 3,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=max_len, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, rms_norm_eps=1e-5,
    )


def build_tiny_model(tokenizer, *, hidden_size: int, num_layers: int, seed: int):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(len(tokenizer), hidden_size=hidden_size, num_layers=num_layers))
    return model.float()


def load_model(path: str, *, dtype=torch.float32, empty: bool = False, options: LoadOptions = LoadOptions()):
    """A causal LM from a local folder or hub name (fp32 master weights by default: bf16 runs autocast;
    ``dtype="auto"``: as stored). ``empty``: read only the config and build the model with
    :func:`empty_model` (no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if empty:
        config = AutoConfig.from_pretrained(path, **options.config_kwargs())
        return empty_model(config, dtype=stored_dtype(config) if dtype == "auto" else dtype, options=options)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **options.model_kwargs())


def stored_dtype(config) -> torch.dtype:
    """The dtype a checkpoint's config says its weights are stored in (float32 when it does not say)."""
    d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(d, str):
        d = getattr(torch, d, None)
    return d if isinstance(d, torch.dtype) else torch.float32


_SCORE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what allo.select reads


def local_folder(name_or_path: str) -> str | None:
    """The local folder with ``name_or_path``'s files: the folder itself, or for a hub name the snapshot
    that loading it put in the Hugging Face cache (nothing is downloaded here); None when there is none."""
    path = os.path.expanduser(name_or_path)
    if os.path.isdir(path):
        return path
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name_or_path, local_files_only=True)
    except (OSError, ValueError):  # not in the cache (LocalEntryNotFoundError), not a repo id (HFValidationError)
        return None


def _weight_map(path: str) -> dict[str, str] | None:
    """Weight name -> safetensors file of the model folder ``path``, from its
    ``model.safetensors.index.json`` (``save_pretrained`` shards a model larger than its
    ``max_shard_size``); None when there is no index (the weights are in ``model.safetensors``, if any)."""
    import json

    index = os.path.join(path, "model.safetensors.index.json")
    if not os.path.isfile(index):
        return None
    with open(index) as f:
        return json.load(f)["weight_map"]


def mapped_weights(path: str, model) -> dict[str, torch.Tensor] | None:
    """The weights of the model folder ``path`` by ``model``'s parameter names, as tensors that map the
    folder's safetensors files (read from disk on use, held as page cache, which the OS may drop: no
    process memory for them), in their stored dtype. ``model`` gives the names and shapes (an
    :func:`empty_model` will do). None when the folder's weights are not safetensors holding every
    parameter under its name with its shape (the caller then loads the model whole).

    Why: weight-delta scores read each weight of two models (the warm-up and the SFT model) a few times
    and never change them. Loaded as fp32 models, every weight stored in another dtype is copied (an SFT
    model stored in bf16, as most are: 4 bytes of memory per parameter, 32 GB for an 8B model); on this
    CPU, 82M parameters with the SFT model in bf16, the selection's peak process memory went from 388 MB to
    82 MB (its masks)."""
    from safetensors import safe_open

    file_of = _weight_map(path)
    if file_of is None and not os.path.isfile(os.path.join(path, "model.safetensors")):
        return None
    wanted = dict(model.named_parameters())
    by_file: dict[str, list[str]] = {}
    for name in wanted:
        file = "model.safetensors" if file_of is None else file_of.get(name)
        if file is None:
            return None
        by_file.setdefault(file, []).append(name)
    out = {}
    for file, names in by_file.items():
        with safe_open(os.path.join(path, file), framework="pt") as f:
            keys = set(f.keys())
            for name in names:
                if name not in keys:
                    return None
                t = f.get_tensor(name)  # a view of the file's memory map: nothing read yet
                if tuple(t.shape) != tuple(wanted[name].shape) or t.dtype not in _SCORE_DTYPES:
                    return None  # (another dtype, fp8 say: loading the model converts it)
                out[name] = t
    return out


def empty_model(config, *, dtype=torch.float32, options: LoadOptions = LoadOptions(), model_class=None):
    """The causal LM of ``config`` with every parameter on the meta device: no memory, no init.
    Buffers are built for real by the model's own ``__init__``: non-persistent ones (rotary
    ``inv_freq``) are in no state dict, so no weight broadcast would ever fill them in. ``model_class``:
    the class to build (a loaded model's own, e.g. one from a model folder's code), else the one
    transformers maps ``config`` to."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        if model_class is not None:
            model = model_class._from_config(config, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, **options.model_kwargs())
    model.tie_weights()  # init_empty_weights gives every module its own meta parameter, untying them
    return model


def load_tokenizer(path: str | None, options: LoadOptions = LoadOptions()):
    """The tokenizer saved with ``path`` (or the built-in one for the built-in tiny model)."""
    if path is None:
        from .tokenizer import load_builtin_tokenizer

        return load_builtin_tokenizer()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, **options.config_kwargs())
    if tok.eos_token_id is None:
        # every response ends with it (and padding falls back to it): without one a stage fails mid-run
        from .config import RunError

        raise RunError(f"--model_name_or_path {path}: its tokenizer has no end-of-sequence token (eos_token); set "
                       "the one the model was trained with and save it into the folder (tokenizer.eos_token = "
                       "'...'; tokenizer.save_pretrained(folder))")
    if tok.pad_token is None:  # Llama-style tokenizers ship without one; padding is masked anyway
        tok.pad_token = tok.eos_token
    return tok


def save_model(model, tokenizer, path: str) -> None:
    """HF folder (config.json, model.safetensors, tokenizer) written to a temporary folder then put in
    place by :func:`folders.replace`: a crash leaves the old folder whole or the new one, never a
    half-deleted one (only between two renames is ``path`` briefly absent; the stage's DONE was removed
    when it started, so that never passes for a complete stage). Leftovers of a crash are removed by the
    next save."""
    from . import folders

    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    folders.remove_leftovers(os.path.dirname(os.path.abspath(path)))
    model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    folders.replace(tmp, path)


def sft_train(model, tokenizer, problems, *, steps: int, lr: float, batch_size: int, seed: int, progress=True):
    """Supervised fine-tuning on the problems' gold solutions (loss on response tokens only)."""
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    from .data import encode_text_pair, collate

    examples = [encode_text_pair(tokenizer, p.prompt, p.solution) for p in problems]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, max(1, steps // 20), steps)
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    model.train()
    bar = tqdm(range(steps), desc="sft", disable=not progress, leave=False)
    order, pos = torch.randperm(len(examples), generator=gen), 0
    for _ in bar:
        if pos + batch_size > len(order):
            order, pos = torch.randperm(len(examples), generator=gen), 0
        batch = collate([examples[i] for i in order[pos:pos + batch_size].tolist()], tokenizer.pad_token_id, device)
        pos += batch_size
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{out.loss.item():.3f}")
    model.eval()
    return model


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], *, num_return_sequences: int = 1, do_sample: bool = False,
             temperature: float = 0.7, top_p: float = 0.95, max_new_tokens: int = 32, batch_size: int = 64,
             seed: int = 0, progress: bool = True, desc: str = "generate",
             synced_gpus: bool = False) -> list[list[str]]:
    """Responses for every prompt (``num_return_sequences`` each), decoded without special tokens.
    ``synced_gpus``: every process keeps running forwards until all processes' sequences have ended
    (a sharded model's forwards are collectives; see ``allo.train.fsdp.sharded_generate``)."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends on the right
    device = next(model.parameters()).device
    out: list[list[str]] = []
    per_batch = max(1, batch_size // num_return_sequences)
    try:
        for start in tqdm(range(0, len(prompts), per_batch), desc=desc, disable=not progress, leave=False,
                          total=math.ceil(len(prompts) / per_batch)):
            chunk = prompts[start:start + per_batch]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            kwargs = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if do_sample else dict(do_sample=False)
            if synced_gpus:
                kwargs["synced_gpus"] = True
            # only the ids and their mask: a tokenizer's token_type_ids (Falcon's) make generate refuse
            seqs = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                  max_new_tokens=max_new_tokens, num_return_sequences=num_return_sequences,
                                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **kwargs)
            texts = tokenizer.batch_decode(seqs[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for i in range(len(chunk)):
                out.append(texts[i * num_return_sequences:(i + 1) * num_return_sequences])
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out


def read_folder_weights(path: str) -> tuple[dict, str]:
    """Every tensor of the HF model folder ``path``, read into memory, and the file(s) they came from
    (for errors): its ``model.safetensors``, or the shards its index names (see :func:`_weight_map`)."""
    from safetensors.torch import load_file

    file_of = _weight_map(path)
    files = ["model.safetensors"] if file_of is None else sorted(set(file_of.values()))
    weights = {}
    for file in files:
        weights.update(load_file(os.path.join(path, file)))
    return weights, os.path.join(path, files[0]) if len(files) == 1 else f"{path}/{{{','.join(files)}}}"


def load_full_weights(model, weights: dict, *, source: str) -> None:
    """Load a full state dict into ``model`` (plain, unsharded) with a clear error if it does not fit.
    Tied weights are saved once (under the other name); anything else missing is the wrong file."""
    missing, unexpected = model.load_state_dict(weights, strict=False)
    state = model.state_dict()
    loaded = {t.data_ptr() for n, t in state.items() if n in weights}
    missing = [m for m in missing if state[m].data_ptr() not in loaded]
    if unexpected or missing:
        raise ValueError(f"{source} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
