"""A peft adapter saved beside a context: the folder adapter/ in peft's own format.

`deepthink tune --method lora|lora_icl|ia3|prefix|prompt|cpt` saves the chosen adapter with the PeftModel's own
`save_pretrained` (adapter/adapter_config.json and adapter/adapter_model.safetensors), so that peft users can load
it with `PeftModel.from_pretrained(base_model, "DIR/adapter")`. context.json records the files' sha256 and whether
the context needs the adapter in the model:

    in_model true   lora, lora_icl, ia3: the adapter changes the model's weights in use; the saved cache (the
                    tokenizer's special tokens, or the demonstrations for lora_icl) was encoded by the adapted model,
                    and loading puts the adapter into the model (in place) before anything is scored
    in_model false  prefix, prompt, cpt: peft's prompt, turned into an ordinary prefix cache (context.safetensors),
                    answers alone; the adapter is kept for peft users and is never read by deepthink
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

INSTALL = "pip install 'deepthink[peft]' (peft==0.21.2)"
ADAPTER_DIR = "adapter"
FILES = ("adapter_config.json", "adapter_model.safetensors")     # what peft's save_pretrained writes and reads


def peft_module():
    """The peft library, or an ImportError that says how to install it."""
    try:
        import peft
    except ImportError:
        raise ImportError(f"the peft baselines need the peft library: {INSTALL}") from None
    return peft


def in_model(meta: dict) -> bool:
    """Whether the context whose context.json is `meta` needs its adapter in the model (lora, lora_icl, ia3)."""
    return bool((meta.get("adapter") or {}).get("in_model"))


def require_peft(meta: dict) -> None:
    """The install hint (ImportError) before a model loads, if the context's adapter must go into it."""
    if in_model(meta):
        peft_module()


def holds_adapter(model) -> bool:
    """Whether peft has put an adapter's layers into `model` (a LoRA or IA3 layer in place of a linear one)."""
    return any(type(m).__module__.startswith("peft.") for m in model.modules())


@dataclass
class Adapter:
    """The adapter a context carries: `write(folder)` writes peft's files into a folder (at save time); in_model:
    whether the context's cache and scores need it in the model (see the module docstring)."""

    in_model: bool
    write: Callable[[Path], None]
    peft_version: str


def saved_by(peft_model, in_model: bool) -> Adapter:
    """An Adapter written by `peft_model.save_pretrained` (its active adapter's trainable state)."""
    import peft

    def write(folder: Path) -> None:
        # save_embedding_layers=False: peft's "auto" would look up the base model on the hub to compare vocabularies
        peft_model.save_pretrained(str(folder), save_embedding_layers=False)

    return Adapter(in_model, write, peft.__version__)


def read_files(folder: Path, record: dict) -> dict[str, bytes]:
    """The adapter's files, each checked against the sha256 context.json records (ValueError: altered)."""
    from .io import sha256_bytes

    out = {}
    for name in FILES:
        path = folder / name
        try:
            blob = path.read_bytes()
        except OSError as e:
            raise FileNotFoundError(f"{path} cannot be read ({e.strerror or e}): the adapter is incomplete; re-run "
                                    "`deepthink tune`") from None
        digest, want = sha256_bytes(blob), record["sha256"][name]
        if digest != want:
            raise ValueError(f"{path} is altered or truncated: its sha256 is {digest[:16]}, context.json records "
                             f"{want[:16]} ({len(blob)} bytes now); re-run `deepthink tune`")
        out[name] = blob
    return out


def copied(files: dict[str, bytes], record: dict) -> Adapter:
    """An Adapter that writes the checked files it was loaded from (a loaded context saved again)."""
    from .io import write_synced

    def write(folder: Path) -> None:
        for name, blob in files.items():
            write_synced(folder / name, lambda f, b=blob: f.write(b))

    return Adapter(record["in_model"], write, record["peft_version"])


def put_into(lm, folder: Path, files: dict[str, bytes], what: str) -> None:
    """Put the (checked) adapter in `folder` into lm.model, in place, with peft's own loader, and check that every
    tensor of the file is the one now in the model (peft only warns about keys it could not place)."""
    import torch
    from safetensors.torch import load

    peft = peft_module()
    try:
        model = peft.PeftModel.from_pretrained(lm.model, str(folder), is_trainable=False)
    except Exception as e:       # peft's own refusal (a config it cannot read, shapes of another model): say whose
        raise ValueError(f"{what}: peft {peft.__version__} cannot put the adapter into {lm.name!r}: "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; re-run `deepthink tune` "
                         "with this model") from None
    want = load(files[FILES[1]])
    got = peft.get_peft_model_state_dict(model)
    if sorted(got) != sorted(want) or not all(torch.equal(got[k].cpu(), want[k]) for k in want):
        model.unload()
        missing = sorted(set(want) - set(got))
        raise ValueError(f"{what}: the adapter's tensors do not fit {lm.name!r}"
                         + (f" ({missing[0]} has no place in it)" if missing else "")
                         + "; re-run `deepthink tune` with this model")
    model.eval()
    for p in lm.model.parameters():
        p.requires_grad_(False)
