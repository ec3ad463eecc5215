"""The past cache goes under the keyword the model's forward declares (`cache=` from transformers 5.24 on,
`past_key_values=` before): an earlier model would swallow an unknown `cache=` into **kwargs and ignore the past."""
import pytest
import torch
from transformers.modeling_outputs import BaseModelOutputWithPast

from deepthink import kv

from conftest import tiny_lm


class OldForward(torch.nn.Module):
    def forward(self, input_ids, past_key_values=None, use_cache=None, **kwargs):
        return past_key_values


class NewForward(torch.nn.Module):
    def forward(self, input_ids, cache=None, use_cache=None, **kwargs):
        return cache


class KwargsOnly(torch.nn.Module):
    def forward(self, *args, **kwargs):
        return kwargs


def test_the_past_goes_under_the_name_the_forward_declares():
    past = object()
    assert OldForward()(None, **kv.cache_kwarg(OldForward(), past)) is past
    assert NewForward()(None, **kv.cache_kwarg(NewForward(), past)) is past
    # a forward of **kwargs only gets the installed library's own name
    assert kv.cache_kwarg(KwargsOnly(), past) == {("cache" if kv._RENAMED else "past_key_values"): past}


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma3"])
def test_real_models_take_the_past_and_return_it(arch):
    lm = tiny_lm(arch)
    if arch == "gemma3" and not kv._RENAMED:          # sliding-window layers: refused before transformers 5.24
        with pytest.raises(RuntimeError, match="sliding-window"):
            kv.build_cache(lm.model)
        return
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        first = kv.output_cache(lm.model(ids[:, :2], **kv.cache_kwarg(lm.model, kv.build_cache(lm.model)),
                                         use_cache=True))
        with_past = lm.model(ids[:, 2:], **kv.cache_kwarg(lm.model, first), use_cache=True)
        whole = lm.model(ids).logits[:, 2:]
    # the past was used: the last two positions score as in one pass over all four tokens
    assert torch.allclose(with_past.logits, whole, atol=1e-5)
    assert kv.cache_tensors(kv.output_cache(with_past))[0][0].shape[-2] == 4


def test_output_cache_reads_either_field_and_says_when_there_is_none():
    cache = kv.build_cache(tiny_lm("llama").model)
    assert kv.output_cache({"cache": cache}) is cache
    assert kv.output_cache(BaseModelOutputWithPast(last_hidden_state=torch.zeros(1), past_key_values=cache)) is cache
    with pytest.raises(RuntimeError, match="holds no cache although use_cache=True"):
        kv.output_cache(BaseModelOutputWithPast(last_hidden_state=torch.zeros(1)))


def test_sliding_window_models_are_refused_before_transformers_5_24(monkeypatch):
    gemma, llama = tiny_lm("gemma3"), tiny_lm("llama")
    monkeypatch.setattr(kv, "_RENAMED", False)
    with pytest.raises(RuntimeError, match=r"sliding-window attention layers.*transformers 5\.24.*pip install -U"):
        kv.build_cache(gemma.model)
    kv.build_cache(llama.model)          # no sliding layers: built as before
