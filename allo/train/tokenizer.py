"""The character-level tokenizer shipped with allo for the built-in tasks (assets/tokenizer.json).

Characters keep the vocabulary tiny (under 100 tokens) and let a 2-layer model learn the tasks in
seconds. ``build_tokenizer`` is how the asset was made; a test checks the two agree.
"""

from __future__ import annotations

import os
import string

from allo._atomic import atomic_path

ASSET = os.path.join(os.path.dirname(__file__), "assets", "tokenizer.json")
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = string.digits + string.ascii_letters + " .,:;?!'\"+-*/=<>()%$#\n"
# One user message becomes "Q: {content}\nA: ", an assistant message is "{content}</s>": the same
# layout allo.train.tasks.format_prompt writes for the built-in problems.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}Q: {{ m['content'] }}\nA: "
    "{% elif m['role'] == 'assistant' %}{{ m['content'] }}</s>"
    "{% endif %}{% endfor %}"
)


def build_tokenizer():
    """A ``tokenizers.Tokenizer`` that maps every character of CHARS to its own id."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIAL + list(CHARS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()  # characters join with nothing between them
    tok.add_special_tokens(SPECIAL)
    return tok


def write_asset(path: str = ASSET) -> None:
    with atomic_path(path) as tmp:
        build_tokenizer().save(tmp)


def load_builtin_tokenizer():
    """The shipped tokenizer as a ``transformers.PreTrainedTokenizerFast`` with a chat template."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=ASSET, pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>", unk_token="<unk>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


if __name__ == "__main__":  # python -m allo.train.tokenizer  rewrites the asset
    write_asset()
