from pathlib import Path

import pytest
from transformers import AutoTokenizer

from cord.common import prompts

MODELS = Path(__file__).resolve().parents[2] / "models"


def test_trajectory_text_layout():
    steps = ["### Step 1. 7 + 2", "### Step 2. 9"]
    assert prompts.think_body(steps, 3) == "### Step 1. 7 + 2\n### Step 2. 9\n### Step 3."
    assert prompts.scoring_context(steps).endswith("### Step 2. 9\n</think> The final answer is")
    assert prompts.answer_target("9 ") == " 9"
    assert prompts.assistant_message(steps, " The final answer is 9. ") == (
        "<think>\n### Step 1. 7 + 2\n### Step 2. 9\n</think>\n\nThe final answer is 9."
    )
    assert prompts.clean_step("### Step 3.", " 4 + 5 \n") == "### Step 3. 4 + 5"


@pytest.mark.parametrize(
    ("model", "starts", "ends"),
    [
        (
            "alpha",
            "<|start_header_id|>user<|end_header_id|>\n\n",
            "<|start_header_id|>assistant<|end_header_id|>\n\n<think>\n",
        ),
        ("beta", "<|user|>\n", "<|assistant|>\n<think>\n"),
        ("gamma", "[INST] ", "[/INST]<think>\n"),
        ("meta", "<|im_start|>user\n", "<|im_start|>assistant\n<think>\n"),
    ],
)
def test_each_model_renders_under_its_own_template(model, starts, ends):
    tok = AutoTokenizer.from_pretrained(MODELS / model)
    text = prompts.chat_prefix(tok, prompts.user_prompt("What is 1 + 2?"))
    assert text.startswith(starts)
    assert text.endswith(ends)
    # meta's template opens <think> itself: it must not be doubled
    assert text.split("Problem:")[1].count("<think>") == 1
    assert "Problem: What is 1 + 2?" in text
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
