"""Embeddings on the real sentence-transformers stand-in."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest

from tests.e2e.node_process import NodeProcess

pytestmark = pytest.mark.e2e

MODEL = "bge-m3:latest"


def _cos(a: list[float], b: list[float]) -> float:
    va, vb = np.asarray(a), np.asarray(b)
    return float(va @ vb / (np.linalg.norm(va) * np.linalg.norm(vb)))


def test_similar_sentences_score_closer_than_unrelated(client: openai.OpenAI) -> None:
    texts = [
        "The cat sits on the mat.",
        "A cat is sitting on a rug.",
        "Quarterly tax filings are due in April.",
    ]
    result = client.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    vecs = [d.embedding for d in sorted(result.data, key=lambda d: d.index)]
    assert len(vecs) == 3 and len(vecs[0]) == 384
    assert _cos(vecs[0], vecs[1]) > _cos(vecs[0], vecs[2]) + 0.2
    assert result.usage.prompt_tokens > 10
    assert result.usage.total_tokens == result.usage.prompt_tokens


def test_base64_and_float_agree(client: openai.OpenAI) -> None:
    as_float = client.embeddings.create(model=MODEL, input="hej", encoding_format="float")
    as_b64 = client.embeddings.create(model=MODEL, input="hej")  # the SDK asks for base64
    assert np.allclose(as_float.data[0].embedding, as_b64.data[0].embedding, atol=1e-6)


def test_empty_input_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model=MODEL, input=[])
    assert info.value.body["param"] == "input"  # type: ignore[index]


def test_more_than_300k_tokens_in_one_request_is_400_and_costs_nothing(
    node: NodeProcess,
) -> None:
    key = node.create_key("--plan", "agent-pro")
    client = openai.OpenAI(api_key=key, base_url=node.base_url + "/v1", max_retries=0)
    texts = [" ".join(["water"] * 150)] * 2048  # 2048 x 152 tokens
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model=MODEL, input=texts)
    assert info.value.code == "max_tokens_per_request" and info.value.param == "input"
    assert "max 300000 tokens per request" in info.value.message
    assert info.value.response.headers["X-RateLimit-Used-Tokens"] == "0"  # 1M/h would fit it
    fits = client.embeddings.create(model=MODEL, input=texts[:4])
    assert len(fits.data) == 4


def test_inputs_too_long_to_fit_are_refused_by_their_length_before_tokenizing(
    node: NodeProcess,
) -> None:
    """Megabytes of text are refused on their character count (no token count can fit them),
    not tokenized first at the node's expense."""
    key = node.create_key("--plan", "agent-pro")
    client = openai.OpenAI(api_key=key, base_url=node.base_url + "/v1", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model=MODEL, input=["hej", "word " * 400_000])
    assert info.value.code == "context_length_exceeded" and info.value.param == "input"
    assert "Input 1 has 2000000 characters" in info.value.message
    assert node.used_tokens(key) == 0
    # Whitespace the tokenizer drops is no reason to refuse: a padded table that fits.
    table = "\n".join(" ".join(f"{w:>60}" for w in ("kol", "rad", "cell")) for _ in range(40))
    assert len(table) > 256 * 18  # the window at the vocabulary's longest token
    assert len(client.embeddings.create(model=MODEL, input=table).data) == 1


def test_chat_model_on_embeddings_route_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model="qwen3.5:9b", input="hej")
    assert info.value.code == "model_not_supported"
    assert "is a chat model; this route needs an embedding model" in info.value.message


def test_concurrent_requests_are_batched_and_each_gets_its_own_vectors(
    client: openai.OpenAI,
) -> None:
    """Many clients at once, texts of mixed lengths: every request succeeds (token counting
    and batched encoding share no tokenizer state) and gets the vector it would get alone."""
    texts = [" ".join(["Stockholm är en stad vid vattnet"] * (1 + i % 9)) for i in range(240)]
    alone = {t: client.embeddings.create(model=MODEL, input=t).data[0].embedding for t in texts[:9]}
    with ThreadPoolExecutor(max_workers=16) as pool:  # the stand-in's slots
        together = list(pool.map(lambda t: client.embeddings.create(model=MODEL, input=t), texts))
    for text, result in zip(texts, together, strict=True):
        assert result.usage.prompt_tokens > 0
        assert np.allclose(result.data[0].embedding, alone[text], atol=1e-4)


def test_a_client_that_leaves_a_big_request_frees_its_slot_and_pays_for_what_was_encoded(
    node: NodeProcess,
) -> None:
    """Thousands of inputs take many seconds on the CPU stand-in; the client gives up after
    1.5 s. The request ends there (the engine drops the pieces it has not started, unit-tested
    in test_st_embed.py), and the key pays for the inputs encoded, not for all of them."""
    key = node.create_key("--plan", "agent-pro")
    client = openai.OpenAI(api_key=key, base_url=node.base_url + "/v1", max_retries=0)
    texts = [
        f"Mening nummer {i} om vädret, tågen och elpriset i Sverige i vinter." for i in range(2048)
    ]
    one = client.embeddings.create(model=MODEL, input=texts[1000]).usage.prompt_tokens
    before = node.used_tokens(key)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            node.base_url + "/v1/embeddings",
            headers={"Authorization": f"Bearer {key}"},
            json={"model": MODEL, "input": texts},
            timeout=httpx.Timeout(60, read=1.5),
        )
    assert node.wait_slots_free(MODEL, timeout=30) == 0
    charged = node.used_tokens(key) - before
    assert 0 < charged < len(texts) // 2 * (one - 2)  # the texts differ by a digit or three
    assert len(client.embeddings.create(model=MODEL, input=texts[:3]).data) == 3
