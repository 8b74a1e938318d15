"""The text conventions of CoRD (docs/method: prompt-guided step segmentation).

A trajectory crosses processes as *text*: a list of step strings, each starting with its
``### Step N.`` header. Every model renders it under its own chat template and
tokenizer (see `cord.workers.engines.hf.HFEngine.render`). This module holds only the
model-independent part: the instruction, the step headers, the thinking block and the
scoring suffix, so that the coordinator, the workers, the lab's training data and the
tests all build exactly the same strings.
"""

from __future__ import annotations

from collections.abc import Sequence

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
STEP_PREFIX = "### Step"
# Expansion stops at the next step header or at the end of thinking.
STEP_STOPS = (STEP_PREFIX, THINK_CLOSE)
# docs/method.md, step 4: the meta-prover reads the answer after this lead.
# The text is "...</think> The final answer is <answer>". The space before the answer
# belongs to the answer's tokens, as a BPE tokenizer writes it (" 65" is one token where
# "65" after a trailing-space prompt would be an unnatural split): see `answer_target`.
ANSWER_LEAD = " The final answer is"
STEP_SEPARATOR = "\n"

# The user turn every teacher and the meta-prover see, unless the run config's
# `prompt.template` says otherwise ({question} is replaced by the problem).
DEFAULT_TEMPLATE = (
    "Solve the problem. Think step by step inside <think> and </think>; begin every step "
    "with a header '### Step N.' (N = 1, 2, ...). After </think>, state the final answer as "
    "'The final answer is X.'\n\nProblem: {question}"
)


def user_prompt(question: str, template: str = DEFAULT_TEMPLATE) -> str:
    return template.replace("{question}", question)


def step_header(index: int) -> str:
    """Header of step `index` (1-based)."""
    return f"{STEP_PREFIX} {index}."


def think_body(steps: Sequence[str], next_step: int | None = None) -> str:
    """The thinking text after ``<think>``: the steps so far, then optionally the header
    of the step to be written next (the expansion prompt ends there)."""
    parts = list(steps)
    if next_step is not None:
        parts.append(step_header(next_step))
    return STEP_SEPARATOR.join(parts)


def closed_think(steps: Sequence[str]) -> str:
    """A finished thinking block's body: the steps and ``</think>``."""
    return think_body(steps) + STEP_SEPARATOR + THINK_CLOSE


def scoring_context(steps: Sequence[str]) -> str:
    """What the meta-prover conditions on before the reference answer:
    trajectory + candidate + ``</think> The final answer is`` (docs/method.md, step 4;
    the answer's tokens then start with its space, see `answer_target`)."""
    return closed_think(steps) + ANSWER_LEAD


def answer_target(answer: str) -> str:
    """The reference answer's text as scored after `scoring_context`."""
    return " " + answer.strip()


def answer_context(steps: Sequence[str]) -> str:
    """What a teacher continues when it writes the final answer."""
    return closed_think(steps) + "\n\n"


def assistant_message(steps: Sequence[str], final_answer: str) -> str:
    """The SFT target: ``<think>...</think>`` and the final answer."""
    return f"{THINK_OPEN}\n{answer_context(steps)}{final_answer.strip()}"


def clean_step(header: str, body: str) -> str:
    """A step as stored: its header and the generated body, trailing space trimmed.
    A generated body that itself starts a new line keeps its layout."""
    return (header + body).rstrip()


def chat_prefix(tokenizer: object, user: str) -> str:
    """The text a model sees before the trajectory: the user turn `user` under the
    model's own chat template with its generation prompt, then ``<think>`` and a newline.
    Templates that already open the thinking block (QwQ, R1-Distill) get no second one."""
    rendered = tokenizer.apply_chat_template(  # type: ignore[attr-defined]
        [{"role": "user", "content": user}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert isinstance(rendered, str)
    if rendered.rstrip().endswith(THINK_OPEN):
        return rendered if rendered.endswith("\n") else rendered + "\n"
    return rendered + THINK_OPEN + "\n"
