"""Load a sealed Hugging Face model directory into ``transformers``, in memory only.

The config is decrypted in memory, the model is built with its parameters on the meta device
(``accelerate.init_empty_weights``: nothing allocated, buffers built as usual), each parameter
gets uninitialized CPU storage (tied parameters share one), and every shard is decrypted
straight into that storage. No plaintext touches the disk and no second copy of the weights is
made. Needs the ``hf`` extra (``transformers``, ``accelerate``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from typing import Any

import torch

from sealtorch._secret import wipe
from sealtorch.errors import IndexError_, InputError
from sealtorch.format.dtypes import torch_dtype as dtype_of
from sealtorch.format.keys import KeyProvider
from sealtorch.format.reader import KeyArg, SealedFile, SignerArg
from sealtorch.hf import manifest as mf
from sealtorch.hf.sealed_dir import SealedDir


def _transformers() -> Any:
    try:
        import accelerate  # noqa: F401
        import transformers
    except ImportError:
        raise InputError("sealtorch.hf needs transformers and accelerate: pip install "
                         "'sealtorch[hf]'") from None
    return transformers


def _json(sd: SealedDir, name: str) -> dict[str, Any]:
    """Decrypt a JSON file of the sealing into a dict (the plaintext bytes are wiped)."""
    raw = sd.read_bytes(name)
    try:
        value = json.loads(raw.decode("utf-8"))
    except ValueError:
        raise InputError(f"{name} in {sd.path} is not JSON") from None
    finally:
        wipe(raw)
    if not isinstance(value, dict):
        raise InputError(f"{name} in {sd.path} is not a JSON object")
    return value


def _config(sd: SealedDir, overrides: dict[str, Any]) -> Any:
    """The model's ``PretrainedConfig``, from the sealed (or public) ``config.json``."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    raw = _json(sd, mf.CONFIG_NAME)
    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise InputError(f"config.json in {sd.path}: model_type {str(model_type)[:40]!r} is not "
                         "one this transformers release knows")
    return CONFIG_MAPPING[model_type].from_dict({**raw, **overrides})


def _model_class(config: Any, model_class: Any) -> Any:
    if model_class is not None:
        return model_class
    transformers = _transformers()
    archs = getattr(config, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs else None
    return cls if cls is not None else transformers.AutoModel


def _target(name: str, state: dict[str, torch.Tensor], prefix: str) -> str | None:
    """The module tensor a checkpoint tensor goes to (with or without the base model prefix,
    as transformers loads a base model's checkpoint into a head model and back)."""
    if name in state:
        return name
    p = prefix + "." if prefix else ""
    if p and name.startswith(p) and name[len(p) :] in state:
        return name[len(p) :]
    if p and p + name in state:
        return p + name
    return None


def _materialize(model: torch.nn.Module, dtype_for: Callable[[str], torch.dtype]) -> None:
    """Give every meta parameter uninitialized CPU storage of the dtype it will be loaded in;
    parameters that are one object (tied) stay one."""
    memo: dict[int, torch.nn.Parameter] = {}
    for mname, module in model.named_modules():
        for pname, p in list(module._parameters.items()):
            if p is None or p.device.type != "meta":
                continue
            if id(p) not in memo:
                full = f"{mname}.{pname}" if mname else pname
                memo[id(p)] = torch.nn.Parameter(
                    torch.empty(p.shape, dtype=dtype_for(full)), requires_grad=p.requires_grad
                )
            module._parameters[pname] = memo[id(p)]


def from_pretrained(
    sealed_dir: str | os.PathLike[str],
    *,
    key: KeyArg = None,
    key_provider: KeyProvider | None = None,
    model_class: Any = None,
    torch_dtype: torch.dtype | str | None = None,
    device_map: str | dict[str, str] | None = "cpu",
    signer: SignerArg = None,
    threads: int | None = None,
    **config_overrides: Any,
) -> Any:
    """Load a sealed model directory as a ``transformers`` model (on CPU, in eval mode).

    ``key`` is a model key or key file, ``key_provider`` e.g. a :class:`KeyCacheClient`.
    ``model_class`` defaults to the config's first architecture (e.g. ``LlamaForCausalLM``);
    pass ``AutoModel`` or a head class to choose. ``torch_dtype`` (``None``/``"auto"``: the
    checkpoint's dtypes) casts floating tensors. Every file is checked against the sealed
    manifest before any tensor is decrypted; on any failure the weights are zeroed.
    """
    transformers = _transformers()
    from accelerate import init_empty_weights

    if device_map not in (None, "cpu", {"": "cpu"}):
        raise InputError("sealed weights are decrypted into CPU memory (inside the TEE): use "
                         "device_map='cpu'; moving them elsewhere is the caller's decision")
    want: torch.dtype | None
    if torch_dtype is None or torch_dtype == "auto":
        want = None
    elif isinstance(torch_dtype, torch.dtype):
        want = torch_dtype
    else:
        want = getattr(torch, str(torch_dtype), None)
        if not isinstance(want, torch.dtype):
            raise InputError(f"torch_dtype {str(torch_dtype)[:40]!r} is not a torch dtype")
    with SealedDir(sealed_dir, key=key, key_provider=key_provider, signer=signer) as sd:
        config = _config(sd, config_overrides)
        cls = _model_class(config, model_class)
        with init_empty_weights(include_buffers=False):
            model = cls.from_config(config) if hasattr(cls, "from_config") else \
                cls._from_config(config)
        prefix = getattr(model, "base_model_prefix", "") or ""
        meta_state = model.state_dict(keep_vars=True)
        dtypes: dict[str, torch.dtype] = {}  # module name -> the checkpoint's dtype
        for sf in sd.shards:
            for fname in sf.index.order:
                tname = _target(fname, meta_state, prefix)
                if tname is not None:
                    dtypes[tname] = dtype_of(sf.index.resolve(fname).dtype)

        def dtype_for(name: str) -> torch.dtype:
            file_dtype = dtypes.get(name, want or torch.get_default_dtype())
            return want if want is not None and file_dtype.is_floating_point else file_dtype

        _materialize(model, dtype_for)
        model.tie_weights()
        _load_shards(model, sd.shards, prefix, threads)
        if want is not None or dtypes:
            main = want or max(set(dtypes.values()), key=list(dtypes.values()).count)
            config.dtype = main
        if sd.has_file("generation_config.json") and model.can_generate():
            model.generation_config = transformers.GenerationConfig.from_dict(
                _json(sd, "generation_config.json"))
    return model.eval()


def _ignored(model: torch.nn.Module, name: str, state: dict[str, torch.Tensor]) -> bool:
    """A checkpoint tensor transformers also drops: a non-persistent buffer, or a name the
    model class lists in ``_keys_to_ignore_on_load_unexpected``."""
    buffers = {n for n, _ in model.named_buffers()}
    if name in buffers and name not in state:
        return True
    patterns = getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()
    return any(re.search(p, name) for p in patterns)


def _load_shards(
    model: torch.nn.Module, shards: list[SealedFile], prefix: str, threads: int | None
) -> None:
    """Decrypt every shard into the model's storage: directly where dtypes match, through one
    tensor-sized temporary where a cast is needed. Every module parameter must be covered."""
    state = model.state_dict(keep_vars=True)
    plans: list[tuple[SealedFile, dict[str, torch.Tensor], list[tuple[str, torch.Tensor]]]] = []
    covered: set[int] = set()
    unexpected: list[str] = []
    for sf in shards:
        direct: dict[str, torch.Tensor] = {}
        cast: list[tuple[str, torch.Tensor]] = []
        for fname in sf.index.order:
            tname = _target(fname, state, prefix)
            if tname is None:
                if not _ignored(model, fname, state):
                    unexpected.append(fname)
                continue
            t = state[tname]
            e = sf.index.resolve(fname)
            if tuple(t.shape) != e.shape:
                raise IndexError_(f"tensor {fname!r}: the checkpoint holds {list(e.shape)}, the "
                                  f"model built from its config {list(t.shape)}")
            covered.add(id(t))
            if t.dtype is dtype_of(e.dtype):
                direct[fname] = t
            else:
                cast.append((fname, t))
        plans.append((sf, direct, cast))
    if unexpected:
        raise IndexError_(f"{len(unexpected)} checkpoint tensor(s) have no place in "
                          f"{type(model).__name__} (first: {unexpected[0][:80]!r}); pass the "
                          "right model_class=")
    params = dict(model.named_parameters(remove_duplicate=False))
    missing = [n for n, p in params.items() if id(p) not in covered]
    if missing:
        raise IndexError_(f"{len(missing)} parameter(s) of {type(model).__name__} are in no "
                          f"shard (first: {missing[0][:80]!r}); pass the right model_class=")
    try:
        with torch.no_grad():
            for sf, direct, cast in plans:
                sf.release_pages = True
                sf.load_into_tensors(direct, strict=False, threads=threads, every_chunk=True)
                for fname, t in cast:
                    tmp = sf.load([fname], threads=threads)[fname]
                    t.copy_(tmp)
                    wipe(tmp.reshape(-1).view(torch.uint8).numpy().data)
                sf.close()  # unmap this shard's ciphertext before the next one
    except BaseException:
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        raise


def tokenizer_from_pretrained(
    sealed_dir: str | os.PathLike[str],
    *,
    key: KeyArg = None,
    key_provider: KeyProvider | None = None,
    signer: SignerArg = None,
) -> Any:
    """Load the sealing's fast tokenizer (``tokenizer.json`` with ``tokenizer_config.json`` and
    ``special_tokens_map.json`` when present) in memory, as the class its config names."""
    transformers = _transformers()
    from tokenizers import Tokenizer

    with SealedDir(sealed_dir, key=key, key_provider=key_provider, signer=signer) as sd:
        if not sd.has_file("tokenizer.json"):
            raise InputError(f"{sd.path}: the sealing holds no tokenizer.json (only fast "
                             "tokenizers load from memory); save the tokenizer with a "
                             "tokenizers-backed class and seal again")
        raw = sd.read_bytes("tokenizer.json")
        try:
            backend = Tokenizer.from_str(raw.decode("utf-8"))
        finally:
            wipe(raw)
        kwargs: dict[str, Any] = {}
        if sd.has_file("special_tokens_map.json"):
            kwargs.update(_json(sd, "special_tokens_map.json"))
        if sd.has_file("tokenizer_config.json"):
            kwargs.update(_json(sd, "tokenizer_config.json"))
    base = transformers.PreTrainedTokenizerFast
    name = kwargs.pop("tokenizer_class", None)
    for k in ("name_or_path", "auto_map", "added_tokens_decoder", "tokenizer_file"):
        kwargs.pop(k, None)
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, base)):
        cls = base
    return cls(tokenizer_object=backend, **kwargs)
