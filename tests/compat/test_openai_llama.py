"""The official `openai` npm SDK, unmodified, against `baton run --engine llama` (what
`scripts/run --engine llama` starts after setting up): a frontend and one worker running the llama
engine with the bundled TinyStories model (models/stories260K.gguf), no --model given.

Checks, through the SDK: the model is listed; the greedy completion of "Once upon a time" (64
tokens) is the model's known text (models/README.md) with exact usage, unary and streamed; a seeded
chat at temperature 0.8 gives the same text twice; at temperature 1 and top_p 0 (the smallest nucleus:
only the most probable token) every seed gives the greedy text, completions and a streamed chat,
while the same seeds at top_p 1 do not all give it; a prompt longer than the context is OpenAI's 400
context_length_exceeded (param prompt / messages), unary and streamed, and so is a prompt that fits
with a max_tokens that does not (context - prompt passes exactly; without max_tokens the completion
ends with "length" at the context). Skipped (exit 77) only when scripts/setup was
told not to fetch llama.cpp (BATON_NO_LLAMA=1); otherwise a missing library fails the test.
"""

import os
import shutil
import sys

import batonlib as bl
import npmlib

if os.environ.get("BATON_NO_LLAMA") == "1":
    print("BATON_NO_LLAMA=1: the llama engine was not fetched; skipped")
    sys.exit(77)

bl.deadline(240, "test_openai_llama")
OPENAI_VERSION = "5.23.2"
HERE = os.path.dirname(os.path.abspath(__file__))
STORIES_GREEDY = (", there was a little girl named Lily. She loved to play outside in the park. One day, she saw a big, "
                  "red ball. She wanted to play with it, but it was too high.\nLily's mom said")
EXPECTED = ["models.list", "completions.greedy_text", "completions.stream_greedy_text", "chat.stream_seeded",
            "completions.top_p_zero_greedy", "context_length_exceeded",
            "context_length_max_tokens"]


def main():
    if not shutil.which("node"):
        raise AssertionError("`node` is not on the PATH; scripts/setup installs Node.js and npm")
    sdk_dir = npmlib.ensure_package("openai", OPENAI_VERSION, f"openai-node-{OPENAI_VERSION}")
    with bl.Cluster() as c:
        work = npmlib.node_workdir(c.dir, "node", os.path.join(HERE, "openai_llama_client.mjs"), sdk_dir)
        # `baton run --engine llama`, as the README (and scripts/run) starts it: the bundled model,
        # the libraries from the cache scripts/setup fills
        fe = c.start_run(workers=1, engine="llama", timeout=60)
        env = dict(os.environ, BATON_BASE_URL=f"{fe.url}/v1", BATON_MODEL="stories260K", BATON_EXPECT_TEXT=STORIES_GREEDY)
        result = npmlib.run_node(work, "openai_llama_client.mjs", env, 180)[0]
        names = [ch["name"] for ch in result["checks"]]
        if names != EXPECTED:
            raise AssertionError(f"the client ran checks {names}, expected {EXPECTED}")
        bad = [ch for ch in result["checks"] if not ch["ok"]]
        if bad:
            raise AssertionError("failed checks:\n" + "\n".join(f"{ch['name']}: {ch['detail']}" for ch in bad))
        print(f"openai npm SDK {result['sdk']} against the llama engine: {len(names)} checks passed")


main()
