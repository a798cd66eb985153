"""The lean GPT-2 decode path reproduces the transformers model exactly, so sampling is unchanged by it."""
import warnings

import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig

from rlhf_core.train.gpt2_decode import GPT2Decoder, supports
from rlhf_core.train.policy import load_tokenizer, position_ids_from_mask
from rlhf_core.train.sampling import HFDecoder, _sample, sample_next


def _left_padded(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    enc = tok(["The movie was", "Honestly the food was very good and", "hi"], return_tensors="pt", padding=True)
    assert enc.attention_mask[:, 0].tolist() == [0, 1, 0]  # left padding, as the runner samples
    return enc.input_ids, enc.attention_mask, tok


def test_lean_decoder_matches_hf_logits_at_every_position(tiny_model_dir):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    assert supports(model)
    ids, mask, _ = _left_padded(tiny_model_dir)
    new = torch.randint(0, model.config.vocab_size, (3, 5))
    full_ids, full_mask = torch.cat([ids, new], 1), torch.cat([mask, torch.ones_like(new)], 1)
    with torch.inference_mode():
        want = model(full_ids, attention_mask=full_mask, position_ids=position_ids_from_mask(full_mask)).logits
        dec = GPT2Decoder(model, 3, full_ids.shape[1])
        got = [dec.forward(ids, position_ids_from_mask(mask), mask)]
        pos = mask.sum(-1, keepdim=True)
        for j in range(new.shape[1] - 1):
            got.append(dec.forward(new[:, j:j + 1], pos + j, full_mask[:, : ids.shape[1] + j + 1]))
    got = torch.stack(got, 1)
    torch.testing.assert_close(got, want[:, ids.shape[1] - 1: -1], rtol=1e-5, atol=1e-5)


def test_sampling_with_lean_and_hf_decoders_gives_the_same_tokens(tiny_model_dir, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids, mask, tok = _left_padded(tiny_model_dir)
    kw = dict(max_new_tokens=8, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, temperature=1.0,
              top_k=0, top_p=1.0)
    with torch.inference_mode():
        lean = _sample(model, ids, mask, generator=torch.Generator().manual_seed(3), **kw)
        monkeypatch.setattr("rlhf_core.train.sampling.make_decoder", lambda m, b, n: HFDecoder(m))
        hf = _sample(model, ids, mask, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(lean.input_ids, hf.input_ids) and torch.equal(lean.response_mask, hf.response_mask)


def test_only_plain_gpt2_qualifies():
    assert not supports(GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=16,
                                                   scale_attn_by_inverse_layer_idx=True)))
    llama = AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                         num_attention_heads=2, num_key_value_heads=2,
                                                         vocab_size=32))
    assert not supports(llama)


def test_other_models_sample_through_their_cache_like_a_full_forward():
    """A non-GPT-2 model decodes through transformers' ``cache=`` (no deprecated ``past_key_values=``, which
    transformers 5.40 removes): same tokens as sampling from a full forward over the whole sequence each step."""
    torch.manual_seed(0)
    llama = AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                         num_attention_heads=4, num_key_value_heads=2,
                                                         vocab_size=64)).eval()
    ids = torch.randint(1, 64, (3, 6))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding, as the runner samples
    mask[2, :4] = 0
    ids = ids.masked_fill(mask == 0, 0)
    steps = 6
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        with torch.inference_mode():
            got = _sample(llama, ids, mask, max_new_tokens=steps, eos_token_id=-1, pad_token_id=0,
                          generator=torch.Generator().manual_seed(5), temperature=1.0, top_k=0, top_p=1.0)
    gen = torch.Generator().manual_seed(5)
    seq, seq_mask = ids, mask
    with torch.inference_mode():
        for _ in range(steps):
            logits = llama(seq, attention_mask=seq_mask, position_ids=position_ids_from_mask(seq_mask)).logits[:, -1]
            nxt = sample_next(logits, gen, 1.0, 0, 1.0)
            seq, seq_mask = torch.cat([seq, nxt[:, None]], 1), torch.cat([seq_mask, torch.ones_like(nxt)[:, None]], 1)
    assert torch.equal(got.input_ids, seq) and got.response_mask.all()
