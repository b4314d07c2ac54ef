"""TempNet's τ in generation composes with the generation config's temperature / top-k / top-p."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessorList
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from dist_tempnet.models.generation import TempNetLogitsProcessor
from dist_tempnet.tempnet import LMTempNet

V = 64


def _model_and_tempnet():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, eos_token_id=1, pad_token_id=0, bos_token_id=2,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # sharper logits than a random init gives, so top-p actually truncates
        model.lm_head.weight.mul_(8)
    model.generation_config.update(do_sample=True, temperature=0.7, top_k=20, top_p=0.8)
    tempnet = LMTempNet(V, hidden_size=16, tau_min=0.3, tau_max=3.0, dropout=0.0).eval()
    return model, tempnet


def test_tau_divides_raw_logits_before_the_generation_configs_warpers():
    model, tempnet = _model_and_tempnet()
    proc = TempNetLogitsProcessor(tempnet)
    prompt = torch.tensor([[2, 5, 9, 13]])
    out = model.generate(
        prompt, logits_processor=LogitsProcessorList([proc]), max_new_tokens=5, min_new_tokens=5,
        output_scores=True, output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip
    warpers = [TemperatureLogitsWarper(0.7), TopKLogitsWarper(20), TopPLogitsWarper(0.8)]

    def warp(ids, scores):
        for w in warpers:
            scores = w(ids, scores)
        return scores

    reversed_differs, kept_counts = False, []
    for step, (raw, final) in enumerate(zip(out.logits, out.scores)):
        ids = out.sequences[:, : prompt.shape[1] + step]
        # `logits` are the model's raw output; the config's min_new_tokens processor masks EOS to
        # -inf before TempNet, which reads the row's smallest finite logit in its place.
        masked = raw.clone()
        masked[:, 1] = float("-inf")
        seen = masked.clone()
        seen[:, 1] = raw[:, torch.arange(V) != 1].min()
        tau = tempnet(seen)
        assert torch.allclose(proc.taus[step], tau.float())
        expected = warp(ids, masked / tau.unsqueeze(-1))
        assert torch.equal(torch.isinf(final), torch.isinf(expected))
        kept = ~torch.isinf(expected)
        assert torch.allclose(final[kept], expected[kept], atol=1e-5)
        kept_counts.append(int(kept.sum()))
        # The other order (temperature/top-k/top-p first, τ of the warped logits last) is different.
        other = warp(ids, masked.clone())
        floor = other[~torch.isinf(other)].min()
        other = other / tempnet(torch.where(torch.isinf(other), floor, other))[:, None]
        reversed_differs |= not torch.allclose(torch.softmax(other, -1), torch.softmax(final, -1), atol=1e-4)
    assert reversed_differs
    assert any(1 < k < 20 for k in kept_counts), kept_counts  # top-p truncated, after τ


def test_generate_text_uses_the_exported_generation_config(tmp_path):
    from transformers import AutoTokenizer

    from dist_tempnet.commands.generate import generate_text
    from tests._tiny_hf import save_tiny_chat_tokenizer

    tokenizer = save_tiny_chat_tokenizer(tmp_path / "tok")
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    model, _ = _model_and_tempnet()
    model.resize_token_embeddings(len(tokenizer))
    tempnet = LMTempNet(len(tokenizer), hidden_size=16, tau_min=0.3, tau_max=3.0, dropout=0.0)
    greedy_card = model.generation_config
    greedy_card.update(do_sample=True, top_k=1)  # the card says: keep only the best token
    a = generate_text(model, tokenizer, tempnet, "the quick", max_new_tokens=6, seed=0)
    b = generate_text(model, tokenizer, tempnet, "the quick", max_new_tokens=6, seed=1)
    assert a[0] == b[0], "top_k=1 from the generation config must make sampling deterministic"
    c = generate_text(model, tokenizer, tempnet, "the quick", max_new_tokens=6, seed=1, top_k=0)
    d = generate_text(model, tokenizer, tempnet, "the quick", max_new_tokens=6, seed=2, top_k=0)
    assert len(a[2]) == 6 and (c[0] != a[0] or d[0] != a[0])  # an explicit override wins
