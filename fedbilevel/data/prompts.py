"""Prompt template and the example record shared by the data pipeline."""

from __future__ import annotations

from dataclasses import dataclass

# "Alpaca short" template, as in the FedDPA/FedBip reference code, so prompts
# (and therefore scores) stay comparable with the published baselines.
PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"


@dataclass(frozen=True)
class Example:
    """One instruction-following example.

    Attributes
    ----------
    instruction : str
        The instruction text shown to the model (without the template).
    output : str
        The reference response.
    task : str
        Identifier of the task that produced the example (e.g. ``"reverse"``).
    """

    instruction: str
    output: str
    task: str


def format_prompt(instruction: str) -> str:
    """Wrap an instruction in :data:`PROMPT_TEMPLATE`.

    Parameters
    ----------
    instruction : str
        The instruction text.

    Returns
    -------
    str
        The prompt, ending with ``"### Response:\\n"`` so that the model's
        continuation is the response.
    """
    return PROMPT_TEMPLATE.format(instruction=instruction)
