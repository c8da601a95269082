"""Checking a Kubernetes manifest against the API's object schemas, offline."""

from __future__ import annotations

import json


def roundtrip_equal(doc: dict) -> bool:
    """Deserialize into the kubernetes client's typed model and back: a misspelt or
    misplaced field is dropped on the way, so the two differ."""
    from kubernetes import client

    class Response:
        data = json.dumps(doc)

    version = doc["apiVersion"].split("/")[-1].capitalize()
    api = client.ApiClient()
    back = api.sanitize_for_serialization(api.deserialize(Response, f"{version}{doc['kind']}"))

    def norm(x):
        if isinstance(x, dict):
            return {k: norm(v) for k, v in x.items() if v is not None}
        return [norm(v) for v in x] if isinstance(x, list) else str(x)

    return norm(back) == norm(doc)
