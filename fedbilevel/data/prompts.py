"""The prompt template every text example is shown to the model in."""

from __future__ import annotations

# "Alpaca short" template, as in the FedDPA/FedBip reference code, so prompts
# (and therefore scores) stay comparable with the published baselines.
PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"


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
