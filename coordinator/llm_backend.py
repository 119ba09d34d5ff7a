"""An OpenAI-compatible chat endpoint as a behaviour backend (the simulation's only network
client, kept outside ``simulation/``: the simulation receives it as a
:class:`simulation.behaviour.BehaviourBackend`)."""

from __future__ import annotations

import hashlib
import json
import time

import httpx

from simulation.behaviour.backends import ACTIONS, BehaviourBackendError, Situation

__all__ = ["LLMBackend"]


class LLMBackend:
    """Asks an OpenAI-compatible chat endpoint; answers "yes"/"no" become 1/0.

    Replies are cached by (model, prompt, sample index); transient failures are retried
    with exponential backoff; every request has a timeout. Errors raise
    :class:`BehaviourBackendError` with the endpoint's message.
    """

    def __init__(self, base_url: str, model: str = "default", *, api_key: str | None = None,
                 timeout: float = 10.0, retries: int = 3, backoff: float = 0.2,
                 temperature: float = 0.7) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.retries = retries
        self.backoff = backoff
        self.temperature = temperature
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(timeout=timeout, headers=headers)
        self._cache: dict[str, float] = {}
        self.requests = 0

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self._client.close()

    def __enter__(self) -> LLMBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _prompt(self, situation: Situation, action: str) -> list[dict[str, str]]:
        question = {
            "isolate": "Will you stay home and isolate today?",
            "mask": "Will you wear a mask in public today?",
            "test": "Will you get tested today?",
        }[action]
        return [
            {"role": "system", "content": "You role-play a New York City resident during the COVID-19 pandemic. Answer only yes or no."},
            {"role": "user", "content": f"You are: {situation.describe()}. {question}"},
        ]

    def _ask(self, messages: list[dict[str, str]], sample: int) -> float:
        key = hashlib.sha256(json.dumps([self.model, messages, sample]).encode()).hexdigest()
        if key in self._cache:
            return self._cache[key]
        body = {"model": self.model, "messages": messages, "temperature": self.temperature,
                "max_tokens": 3, "seed": sample}
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            try:
                self.requests += 1
                resp = self._client.post(f"{self.base_url}/v1/chat/completions", json=body)
                if resp.status_code >= 500 or resp.status_code == 429:
                    raise httpx.HTTPStatusError(f"status {resp.status_code}", request=resp.request, response=resp)
                if resp.status_code >= 400:
                    raise BehaviourBackendError(f"endpoint refused the request: {resp.status_code} {resp.text[:200]}")
                text = resp.json()["choices"][0]["message"]["content"].strip().lower()
                break
            except (httpx.TransportError, httpx.HTTPStatusError) as exc:
                last = exc
                if attempt == self.retries:
                    raise BehaviourBackendError(f"endpoint failed after {attempt + 1} tries: {exc}") from exc
                time.sleep(self.backoff * 2**attempt)
            except (KeyError, IndexError, TypeError, ValueError) as exc:
                raise BehaviourBackendError(f"unparseable reply from endpoint: {exc}") from exc
        else:  # pragma: no cover - loop always breaks or raises
            raise BehaviourBackendError(str(last))
        if text.startswith("yes"):
            value = 1.0
        elif text.startswith("no"):
            value = 0.0
        else:
            raise BehaviourBackendError(f"expected yes or no, got {text[:40]!r}")
        self._cache[key] = value
        return value

    def query(self, situation: Situation, action: str, m: int) -> list[float]:
        if action not in ACTIONS:
            raise BehaviourBackendError(f"unknown action {action!r}")
        if m < 1:
            raise ValueError("m must be >= 1")
        messages = self._prompt(situation, action)
        return [self._ask(messages, j) for j in range(m)]
