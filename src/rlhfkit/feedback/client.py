"""A client of the labeling app's JSON API, and simulated labelers that label through it (the same
endpoints, authentication and validation as the web page)."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import httpx

from rlhfkit.data.records import Completion, render_text
from rlhfkit.feedback.simulated import SimulatedLabeler
from rlhfkit.reward.base import RewardFn


class FeedbackClient:
    """A logged-in session with the app; raises for unexpected statuses with the server's reason."""

    def __init__(self, url: str, username: str, password: str, timeout: float = 30.0,
                 http: httpx.Client | None = None) -> None:
        """``http``: an existing client to talk through instead (e.g. FastAPI's TestClient for an app
        running in this process)."""
        self.http = http or httpx.Client(base_url=url.rstrip("/"), timeout=timeout)
        response = self.http.post("/api/login", json={"username": username, "password": password})
        self._check(response)
        self.http.headers["X-CSRF-Token"] = response.json()["csrf"]
        self.username = username

    @staticmethod
    def _check(response: httpx.Response) -> httpx.Response:
        if response.status_code >= 400:
            try:
                reason = response.json().get("detail")
            except ValueError:
                reason = response.text[:200]
            raise RuntimeError(f"{response.request.method} {response.request.url.path}: "
                               f"{response.status_code} {reason}")
        return response

    def next_item(self, project: str | None = None) -> dict | None:
        response = self._check(self.http.get("/api/next", params={"project": project} if project else None))
        return None if response.status_code == 204 else response.json()

    def submit(self, item_id: int, groups: list[list[str]], flagged: list[str] = (), seconds: float | None = None
               ) -> dict:
        return self._check(self.http.post("/api/labels", json={"item_id": item_id, "groups": groups,
                                                               "flagged": list(flagged), "seconds": seconds})).json()

    def skip(self, item_id: int) -> None:
        self._check(self.http.post("/api/skip", json={"item_id": item_id}))

    def create_user(self, username: str, role: str = "labeler") -> str:
        """(admin) A new account; returns its invite token."""
        return self._check(self.http.post("/api/admin/users", json={"username": username, "role": role})).json()[
            "invite"]

    def stats(self, project: str | None = None) -> dict:
        return self._check(self.http.get("/api/admin/stats", params={"project": project} if project else None)).json()

    def close(self) -> None:
        self.http.close()


def accept_invite(url: str, token: str, password: str) -> None:
    """Set the password of an invited account (no session needed)."""
    FeedbackClient._check(httpx.post(f"{url.rstrip('/')}/api/invite/{token}", json={"password": password}))


@dataclass
class SimulatedSession:
    """One simulated labeler working through its queue via the API."""

    client: FeedbackClient
    labeler: SimulatedLabeler
    quality: RewardFn
    criterion: str = ""

    def run(self, project: str | None = None, limit: int | None = None, seed: int = 0) -> int:
        """Label until the queue is empty (or ``limit`` items); returns how many were labeled. The noise of
        a ranking is seeded by (``seed``, item), so the labels do not depend on the order the server offers
        the items in (random among equals)."""
        done = 0
        while limit is None or done < limit:
            item = self.client.next_item(project)
            if item is None:
                break
            started = time.perf_counter()
            completions = [Completion(id=c["id"], prompt_id=str(item["item_id"]), prompt=item["prompt"],
                                      text=c["text"], index=i) for i, c in enumerate(item["completions"])]
            prompt = render_text(completions[0].prompt)  # a chat prompt arrives as a list of messages
            scores = self.quality([prompt] * len(completions), [c.text for c in completions]).tolist()
            ranking = self.labeler.rank(completions, scores, random.Random(f"{seed}:{item['item_id']}"),
                                        self.criterion or item["criterion"])
            self.client.submit(item["item_id"], ranking.groups, ranking.flagged, time.perf_counter() - started)
            done += 1
        return done
