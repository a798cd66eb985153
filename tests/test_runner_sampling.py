"""The KV-cache sampling loop agrees with the scoring pass (left padding, positions) and stops at EOS."""
import pytest
import torch

from rlhf_core.train.policy import PolicyWithValue, load_causal_lm, load_tokenizer, score_tokens
from rlhf_core.train.sampling import HFDecoder, generate, pad_and_concat


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the runner does for the tiny model
    tok = load_tokenizer(str(tiny_model_dir))
    model = load_causal_lm(str(tiny_model_dir), "fp32", torch.device("cpu"))
    yield tok, model
    torch.set_num_threads(threads)


def _batch(tok):
    # very different prompt lengths, so the short ones are left-padded
    return tok(["The movie", "Honestly the food at this place was quite", "Our trip"], return_tensors="pt",
               padding=True)


@pytest.mark.parametrize("impl", ["torch", "chunked"])
def test_greedy_samples_are_the_argmax_of_the_scoring_pass(lm, impl):
    tok, model = lm
    enc = _batch(tok)
    assert (enc.attention_mask == 0).any()
    roll = generate(model, enc.input_ids, enc.attention_mask, max_new_tokens=8, eos_token_id=-1,
                    pad_token_id=tok.pad_token_id, generator=torch.Generator().manual_seed(0), top_k=1)
    policy = PolicyWithValue(model, logprob_impl=impl)
    with torch.no_grad():
        scored = policy(roll.input_ids, roll.attention_mask, roll.prompt_len)
        logits = model(input_ids=roll.input_ids, attention_mask=roll.attention_mask,
                       position_ids=(roll.attention_mask.cumsum(-1) - 1).clamp_min(0)).logits
    resp_logits = logits[:, roll.prompt_len - 1: -1]
    assert torch.equal(resp_logits.argmax(-1), roll.response_ids)
    expected = torch.log_softmax(resp_logits, -1).gather(-1, roll.response_ids[..., None]).squeeze(-1)
    torch.testing.assert_close(scored.logp, expected, rtol=1e-4, atol=1e-4)
    assert scored.values.shape == roll.response_ids.shape
    assert (scored.entropy > 0).all()


@pytest.mark.parametrize("chunks", [1, 2])
def test_hidden_states_kept_while_sampling_give_the_scoring_pass_numbers(lm, chunks):
    """The runner's old log-probs, entropy and values come from ``Rollout.hidden`` (no second forward): on real
    tokens they must equal a fresh scoring pass, with left padding, early EOS and chunked rollouts."""
    tok, model = lm
    enc = _batch(tok)
    gen = torch.Generator().manual_seed(5)
    greedy = generate(model, enc.input_ids, enc.attention_mask, max_new_tokens=4, eos_token_id=-1,
                      pad_token_id=tok.pad_token_id, generator=gen, top_k=1)
    eos = int(greedy.response_ids[1, 2])  # pretend this token is EOS, so that row stops early
    step = 2 if chunks == 2 else 3
    parts = [generate(model, enc.input_ids[i: i + step], enc.attention_mask[i: i + step], max_new_tokens=8,
                      eos_token_id=eos, pad_token_id=tok.pad_token_id, generator=gen, top_k=1)
             for i in range(0, 3, step)]
    assert len(parts) == chunks
    roll = pad_and_concat(parts, tok.pad_token_id)
    assert roll.hidden is not None and roll.hidden.shape[:2] == roll.response_ids.shape
    assert not roll.response_mask.all()  # some row stopped early
    policy = PolicyWithValue(model)
    m = roll.response_mask.bool()
    with torch.no_grad():
        fresh = policy(roll.input_ids, roll.attention_mask, roll.prompt_len)
        logp, entropy = score_tokens(model, roll.hidden, roll.response_ids, impl="auto", temperature=1.0,
                                     with_entropy=True)
        values = policy.values_from_hidden(roll.hidden)
    torch.testing.assert_close(logp[m], fresh.logp[m], rtol=0, atol=1e-5)
    torch.testing.assert_close(entropy[m], fresh.entropy[m], rtol=0, atol=1e-5)
    torch.testing.assert_close(values[m], fresh.values[m], rtol=0, atol=1e-5)


def test_the_generic_decoder_keeps_no_hidden_states(lm, monkeypatch):
    tok, model = lm
    enc = _batch(tok)
    monkeypatch.setattr("rlhf_core.train.sampling.make_decoder", lambda m, b, n: HFDecoder(m))
    roll = generate(model, enc.input_ids, enc.attention_mask, max_new_tokens=3, eos_token_id=-1,
                    pad_token_id=tok.pad_token_id, generator=torch.Generator().manual_seed(0))
    assert roll.hidden is None  # the runner then runs the scoring forward itself


def test_generation_stops_at_eos_and_masks_the_rest(lm):
    tok, model = lm
    enc = _batch(tok)
    greedy = generate(model, enc.input_ids, enc.attention_mask, max_new_tokens=6, eos_token_id=-1,
                      pad_token_id=tok.pad_token_id, generator=torch.Generator().manual_seed(0), top_k=1)
    eos = int(greedy.response_ids[0, 1])  # pretend this token is EOS: each row must stop at its first one
    roll = generate(model, enc.input_ids, enc.attention_mask, max_new_tokens=6, eos_token_id=eos,
                    pad_token_id=tok.pad_token_id, generator=torch.Generator().manual_seed(0), top_k=1)
    for row in range(3):
        hits = (greedy.response_ids[row] == eos).nonzero().flatten().tolist()
        n_real = hits[0] + 1 if hits else 6
        mask = roll.response_mask[row].tolist()
        assert mask == [1] * n_real + [0] * (len(mask) - n_real)
        assert bool(roll.eos[row]) == bool(hits)
        assert torch.equal(roll.response_ids[row, :n_real], greedy.response_ids[row, :n_real])
        assert (roll.response_ids[row, n_real:] == tok.pad_token_id).all()
    assert roll.eos[0]
    assert roll.attention_mask.shape == roll.input_ids.shape


def test_sampling_is_reproducible_with_the_same_generator(lm):
    tok, model = lm
    enc = _batch(tok)
    runs = [generate(model, enc.input_ids, enc.attention_mask, max_new_tokens=5, eos_token_id=-1,
                     pad_token_id=tok.pad_token_id, generator=torch.Generator().manual_seed(s), top_p=0.9)
            for s in (1, 1, 2)]
    assert torch.equal(runs[0].input_ids, runs[1].input_ids)
    assert not torch.equal(runs[0].input_ids, runs[2].input_ids)


def test_sample_next_draws_from_the_filtered_distribution():
    from rlhf_core.train.sampling import sample_next

    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = torch.log(probs).expand(20000, 4)
    gen = torch.Generator().manual_seed(0)
    counts = torch.bincount(sample_next(logits, gen, 1.0, 0, 1.0), minlength=4).float() / 20000
    torch.testing.assert_close(counts, probs, atol=0.012, rtol=0)
    counts = torch.bincount(sample_next(logits, gen, 1.0, 2, 1.0), minlength=4).float() / 20000
    torch.testing.assert_close(counts, torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.012, rtol=0)
    hot = torch.bincount(sample_next(logits, gen, 0.5, 0, 1.0), minlength=4).float() / 20000
    sharpened = probs ** 2 / (probs ** 2).sum()  # temperature 0.5 squares the probabilities
    torch.testing.assert_close(hot, sharpened, atol=0.012, rtol=0)
