"""Local training: no aggregation, each client keeps training its own adapter.

The personalization floor every collaborative method must beat: θ̄ᵢ ← θᵢ. It still runs
through Flower (same messages, same train/eval loops), so timings and bytes compare.
"""

from __future__ import annotations

from typing import Any

from fedbilevel.strategies.base import Adapter, PersonalizedStrategy


class LocalOnly(PersonalizedStrategy):
    """Each client's next adapter is the one it just trained (θ̄ᵢ ← θᵢ)."""

    def personalize(self, server_round: int, trained: dict[int, Adapter], weights: dict[int, float]) -> dict[str, Any]:
        """Keep every trained adapter as it is."""
        self.adapters.update(trained)
        return {"participants": sorted(trained)}
