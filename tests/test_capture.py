"""Single-pass capture during generate equals a teacher-forced re-forward of the same tokens."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from persona_compass.chat import render_chat
from persona_compass.generation import SamplingConfig, eos_ids, left_pad
from persona_compass.persona_space.capture import GenerationCapture
from persona_compass.record import record_span_means

PROMPTS = [
    [{"role": "user", "content": "Who are you?"}],
    [{"role": "user", "content": "Tell me about the sea, please, in a long answer."}],
    [{"role": "user", "content": "Hi"}],
]


def reforward_means(model, prompt_ids, new_ids, n_counted):
    """Means over the answer positions of one un-padded forward over prompt + answer."""
    ids = torch.tensor([prompt_ids + new_ids])
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    p = len(prompt_ids)
    # hidden_states[l + 1] is block l's output, except the last entry (final norm applied)
    hs = torch.stack(out.hidden_states[1:-1])[:, 0, p : p + n_counted].float()
    return hs.mean(1)  # (L - 1, D)


@pytest.mark.parametrize("arch_pair", ["llama_pair", "qwen_pair"])
def test_capture_equals_reforward_over_the_same_tokens(arch_pair, request):
    model, tok = request.getfixturevalue(arch_pair)
    stops = [tok.eos_token_id]
    prompts = [render_chat(tok, m, add_generation_prompt=True).input_ids for m in PROMPTS]
    batch = left_pad(prompts, tok.pad_token_id, torch.device("cpu"))
    torch.manual_seed(0)
    with GenerationCapture(model, stop_ids=stops) as cap:
        out = model.generate(
            **batch,
            max_new_tokens=12,
            do_sample=True,
            top_k=0,
            pad_token_id=tok.pad_token_id,
            eos_token_id=stops,
        )
    new = out[:, batch["input_ids"].shape[1] :]
    means, counts = cap.means(), cap.counts()
    assert means.shape == (3, 4, 64)
    for row in range(3):
        ids = new[row].tolist()
        content = ids[: ids.index(stops[0])] if stops[0] in ids else ids
        ended = len(content) < len(ids)
        n = len(content) if ended else len(content) - 1  # the last token is never fed back
        assert int(counts[row]) == n
        if n == 0:
            assert torch.all(means[row] == 0)
            continue
        ref = reforward_means(model, prompts[row], content, n)
        torch.testing.assert_close(means[row, :-1], ref, rtol=1e-4, atol=1e-4)


def test_eos_ends_a_row_and_hooks_are_removed(llama_pair):
    model, tok = llama_pair
    blocks = model.model.layers
    before = [dict(b._forward_hooks) for b in blocks]
    emb_before = dict(model.get_input_embeddings()._forward_pre_hooks)
    ids = torch.randint(10, 200, (2, 5))
    # every token id counts as a stop: nothing is content
    with GenerationCapture(model, stop_ids=list(range(tok.vocab_size + 20))) as cap:
        model.generate(
            input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None
        )
    assert cap.counts().tolist() == [0, 0]
    assert [dict(b._forward_hooks) for b in blocks] == before
    assert dict(model.get_input_embeddings()._forward_pre_hooks) == emb_before


def test_capture_records_only_the_chosen_layers(qwen_pair):
    """layers=...: hooks on those blocks only, one row each, equal to the full capture's rows."""
    model, tok = qwen_pair
    stops = [tok.eos_token_id]
    prompts = [render_chat(tok, m, add_generation_prompt=True).input_ids for m in PROMPTS]
    batch = left_pad(prompts, tok.pad_token_id, torch.device("cpu"))
    blocks = model.model.layers

    def capture(layers):
        torch.manual_seed(0)
        cap = GenerationCapture(model, stop_ids=stops, layers=layers)
        with cap:
            hooked = [i for i, b in enumerate(blocks) if b._forward_hooks]
            model.generate(
                **batch, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id
            )
        return cap, hooked

    full, hooked_all = capture(None)
    part, hooked = capture("-3:-1")  # blocks 1 and 2 of 4
    assert hooked_all == [0, 1, 2, 3] and hooked == [1, 2] and part.layers == [1, 2]
    assert part.means().shape == (3, 2, 64)
    torch.testing.assert_close(part.means(), full.means()[:, [1, 2]])
    assert torch.equal(part.counts(), full.counts())
    assert not any(b._forward_hooks for b in blocks)


@pytest.mark.real_model
def test_real_model_capture_matches_text_reforward(real_pair):
    """Single pass vs the two-pass baseline (decode the answer, re-render, forward again).

    Generating one token past the budget and keeping ``max_new_tokens`` of them makes every
    kept token fed back once, so the single pass covers exactly the stored answer.
    """
    model, tok = real_pair
    budget = 32
    convs = [
        [{"role": "system", "content": "You are a pirate captain."}, {"role": "user", "content": q}]
        for q in ("Who are you?", "What do you eat?", "Say hi.")
    ]
    prompts = [render_chat(tok, c, add_generation_prompt=True).input_ids for c in convs]
    batch = left_pad(prompts, tok.pad_token_id, model.device)
    stops = eos_ids(model, tok)
    torch.manual_seed(1)
    with GenerationCapture(model, stop_ids=stops) as cap:
        out = model.generate(
            **batch,
            max_new_tokens=budget + 1,
            pad_token_id=tok.pad_token_id,
            eos_token_id=stops,
            **SamplingConfig().generate_kwargs(),
        )
    new = out[:, batch["input_ids"].shape[1] :].tolist()
    texts = []
    for row, ids in enumerate(new):
        content = [t for t in ids[: budget + 1]]
        cut = next((i for i, t in enumerate(content) if t in stops), None)
        content = content[:cut] if cut is not None else content[:budget]
        assert int(cap.counts()[row]) == len(content)
        texts.append(tok.decode(content, skip_special_tokens=True))
    full = [[*c, {"role": "assistant", "content": t}] for c, t in zip(convs, texts, strict=True)]
    ref = record_span_means(model, tok, full)
    for row in range(len(convs)):
        cos = F.cosine_similarity(cap.means()[row], ref[row][-1], dim=-1)  # per layer
        assert cos.min() >= 0.999, cos
