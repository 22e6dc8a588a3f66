"""Datasets: load rows, adapt them to canonical rows, tokenize them per stage, collate into batches.

Canonical rows: SFT {prompt, response} | {messages: [{role, content}, ...]} | {text};
preference {prompt, chosen, rejected}; RL prompts {prompt}. A preference row also serves SFT (prompt +
chosen) and RL (its prompt). Shapes: B batch, P prompt length, R reply length, T sequence length.
"""
import functools
import glob
import gzip
import hashlib
import json
import os
import re
import reprlib
import zlib

import datasets
import pyarrow.parquet
import torch
from jinja2 import TemplateError

HH_TURN = "\n\nAssistant:"
HH_SPEAKER = re.compile(r"\n\n(Human|Assistant): ?")  # where each turn of an HH-RLHF transcript starts
ONLINE = ("ppo", "grpo", "rloo")  # the stages that sample from the policy they train: their rows are prompts
REPLIES = ("chosen", "rejected")  # a preference row's replies, in the order pairs are laid out
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
STAGE_COLUMNS = {  # each stage accepts any one of these column sets
    "sft": [("prompt", "response"), ("prompt", "chosen"), ("messages",), ("text",)],
    **dict.fromkeys(("rm", "dpo"), [("prompt", "chosen", "rejected")]),
    **dict.fromkeys(ONLINE, [("prompt",)]),
}
READ_COLUMNS = {column for sets in STAGE_COLUMNS.values() for cols in sets for column in cols}  # + *_ended


class DataError(ValueError):
    """Bad input data; the message is one line naming the source and what was expected."""


def split_hh(row, chat=False):
    """Anthropic/hh-rlhf rows are two transcripts that differ only in the last assistant reply. The
    shared prompt is their common prefix cut after its last '\\n\\nAssistant:', so prompt + reply gives back
    each transcript exactly. A reply that holds a turn marker (transcripts that differ before their last
    reply) would teach the turns after it, the human's too: both replies are emptied, and `tokenize` drops
    and counts the row. chat=True (for a tokenizer with a chat template, as TRL converts hh-rlhf): the
    prompt's turns as chat messages, the replies stripped, for the template to write in the model's own
    format."""
    cut = os.path.commonprefix([row["chosen"], row["rejected"]]).rfind(HH_TURN)
    if cut < 0:
        raise DataError("Anthropic/hh-rlhf row: chosen and rejected share no '\\n\\nAssistant:' turn")
    cut += len(HH_TURN)
    prompt, chosen, rejected = row["chosen"][:cut], row["chosen"][cut:], row["rejected"][cut:]
    if HH_SPEAKER.search(chosen) or HH_SPEAKER.search(rejected):  # turns after the reply
        chosen = rejected = ""
    if chat:
        return {"prompt": hh_messages(prompt), "chosen": chosen.strip(), "rejected": rejected.strip()}
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def hh_messages(transcript):
    """'\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c\\n\\nAssistant:' -> messages user a, assistant b,
    user c (the open assistant turn is the reply's). Turns of one speaker in a row (4 of HH's 2,312 harmless
    test rows) are joined: chat templates want the roles to alternate."""
    parts = HH_SPEAKER.split(transcript)[1:-2]  # speaker, text, speaker, text, ...
    messages = []
    for speaker, text in zip(parts[::2], parts[1::2]):
        role = "user" if speaker == "Human" else "assistant"
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n\n" + text.strip()
        else:
            messages.append({"role": role, "content": text.strip()})
    return messages


def _shp(row):  # labels == 1: comment A is preferred
    a, b = row["human_ref_A"], row["human_ref_B"]
    return {"prompt": row["history"] + "\n\n", "chosen": a if row["labels"] == 1 else b,
            "rejected": b if row["labels"] == 1 else a}


def _tldr_comparison(row):  # replies are written "TL;DR: ..."; make them continue a "TL;DR:" prompt
    def reply(text):
        return " " + text.strip().removeprefix("TL;DR:").strip()
    return {"prompt": row["prompt"].strip() + "\nTL;DR:", "chosen": reply(row["chosen"]),
            "rejected": reply(row["rejected"])}


def _stack_exchange(row, chat=False):
    """StackLLaMA's pairs (Beeching et al. 2023): response_j is the answer voted higher, after "Question:
    ...\\n\\nAnswer:" as StackLLaMA wrote them; for a chat template, the question alone in the user turn."""
    question, chosen, rejected = (row[column].strip() for column in ("question", "response_j", "response_k"))
    if chat:
        return {"prompt": question, "chosen": chosen, "rejected": rejected}
    return {"prompt": f"Question: {question}\n\nAnswer:", "chosen": " " + chosen, "rejected": " " + rejected}


HUB_CONVERTERS = {  # Open-ChatGPT's Hub datasets: published schema -> canonical rows
    "Anthropic/hh-rlhf": split_hh,
    "stanfordnlp/SHP": _shp,
    "CarperAI/openai_summarize_tldr": lambda row: {"prompt": row["prompt"], "response": row["label"]},
    "CarperAI/openai_summarize_comparisons": _tldr_comparison,
    "fka/awesome-chatgpt-prompts": lambda row: {"prompt": row["prompt"]},
    "lvwerra/stack-exchange-paired": _stack_exchange,  # Open-ChatGPT's example 3, StackLLaMA
}
HUB_DATA_DIRS = {  # the dataset's folder for each stage, as StackLLaMA trained; eval.py's: None
    "lvwerra/stack-exchange-paired": {"sft": "data/finetune", "rm": "data/reward", "dpo": "data/reward",
                                      **dict.fromkeys(ONLINE, "data/rl"), None: "data/evaluation"}}


def _stripped(convert, row):
    """`convert`'s row for a chat template, its texts stripped of the spacing that joins a plain-text prompt
    to its reply (SHP's "\\n\\n" after the post, TL;DR's space before the summary): the template writes the
    turns, and a policy taught replies that open with a space would open every reply so."""
    return {column: text.strip() for column, text in convert(row).items()}


CHAT_CONVERTERS = {  # for a chat template
    **{name: functools.partial(_stripped, convert) for name, convert in HUB_CONVERTERS.items()},
    "Anthropic/hh-rlhf": functools.partial(split_hh, chat=True),
    "lvwerra/stack-exchange-paired": functools.partial(_stack_exchange, chat=True)}


def _json_fault(path):
    """Where a .json/.jsonl file stops parsing, as 'line N: reason', or None."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
            text = f.read()
    except (OSError, ValueError, EOFError, zlib.error) as e:  # not gzip, gzip cut short or damaged, not UTF-8
        return f"cannot read it as UTF-8 text ({e})"
    jsonl = path.removesuffix(".gz").endswith(".jsonl")
    lines = text.splitlines() if jsonl else [text]
    found = False  # a row: [], {} and blank lines hold none
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            return f"line {number + e.lineno - 1}: malformed JSON ({e.msg})"
        if not isinstance(row, dict if jsonl else (dict, list)):
            expected = "an object per line" if jsonl else "a list of objects"
            return f"line {number}: a JSON {type(row).__name__}; expected {expected}"
        found = found or bool(row)
    return None if found else "the data set is empty"


def _null_first(path):
    """Whether a .json/.jsonl file's first record is null, which crashes datasets' reader, process and all."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            return re.match(r"\s*(\[\s*)?null\b", f.read(4096)) is not None
    except (OSError, EOFError, zlib.error):  # not gzip, or cut short: datasets and `_json_fault` say so
        return False


def _parquet_fault(path):
    """'the data set is empty' for a parquet file of no rows (datasets says "BatchSize must be greater
    than 0"), else None: its own reason stands."""
    try:
        empty = pyarrow.parquet.ParquetFile(path).metadata.num_rows == 0
    except Exception:  # not parquet: datasets' reason says so
        return None
    return "the data set is empty" if empty else None


def load_rows(source, split="train", chat=False, stage=None):
    """A `datasets.Dataset` of canonical rows from a local .jsonl/.json(.gz) or .parquet file
    or a Hub dataset: Open-ChatGPT's by name through their converters (chat=True: for a tokenizer with a chat
    template, `CHAT_CONVERTERS`; the stage's folder of the dataset: `HUB_DATA_DIRS`), any other in canonical
    columns."""
    ext = os.path.splitext(source.removesuffix(".gz"))[1]
    if ext in LOCAL_FORMATS or os.path.exists(source):
        if ext not in LOCAL_FORMATS or source.endswith(".parquet.gz"):  # parquet compresses inside
            kind = "a directory" if os.path.isdir(source) else "unknown file type"
            raise DataError(f"{source}: {kind}; expected .jsonl, .json or .parquet (the first two optionally "
                            f".gz)")
        if not os.path.isfile(source):
            raise DataError(f"{source}: no such file")
        if os.path.getsize(source) == 0:
            raise DataError(f"{source}: the data set is empty")
        if LOCAL_FORMATS[ext] == "json" and _null_first(source):
            raise DataError(f"{source}: its first record is null; expected an object per line (.jsonl) or a "
                            f"list of objects (.json)")
        try:
            path = glob.escape(os.path.abspath(source))  # datasets reads data_files as a pattern: [v2], *
            rows = datasets.load_dataset(LOCAL_FORMATS[ext], data_files=path, split="train")
        except Exception as e:  # datasets: "An error occurred while generating the dataset"; its cause: why
            fault = (_json_fault if LOCAL_FORMATS[ext] == "json" else _parquet_fault)(source)
            cause = e.__cause__ or e
            raise DataError(f"{source}: {fault or (str(cause) or repr(cause)).splitlines()[0]}") from None
    else:
        data_dir = HUB_DATA_DIRS.get(source, {}).get(stage)
        try:
            rows = datasets.load_dataset(source, split=split, data_dir=data_dir)
        except Exception as e:
            raise DataError(f"{source}: not a local file and not loadable from the Hugging Face Hub "
                            f"({type(e).__name__}); pass a .jsonl/.json/.parquet file") from None
        if source in HUB_CONVERTERS:
            convert = (CHAT_CONVERTERS if chat else HUB_CONVERTERS)[source]
            rows = rows.map(convert, remove_columns=rows.column_names)
    if len(rows) == 0:
        raise DataError(f"{source}: the data set is empty")
    for column, feature in rows.features.items():  # datasets types a column of mixed kinds Json, and reads
        # any text in it that parses as JSON as that JSON: '"Hi"' -> 'Hi', 'null' -> None, 'false' -> False
        if isinstance(feature, datasets.Json) and (column in READ_COLUMNS or column.endswith("_ended")):
            raise DataError(f"{source}: column {column!r} mixes kinds of values (text with chat messages, "
                            f"numbers or true/false); use one kind per file")
    return rows


def check_columns(rows, stage, source):
    """Raise a DataError unless the rows carry one of the column sets the stage accepts."""
    if not any(all(c in rows.column_names for c in cols) for cols in STAGE_COLUMNS[stage]):
        wanted = " or ".join("{" + ", ".join(cols) + "}" for cols in STAGE_COLUMNS[stage])
        raise DataError(f"{source}: --stage {stage} needs columns {wanted}; found {rows.column_names}")


def ensure_pad_token(tokenizer):
    """Give the tokenizer a pad token that is not EOS. Padding with EOS is how a real EOS gets masked
    out of labels, rewards and reward reads (reward models stuck near 60% accuracy, policies that never
    stop). Reuse a distinct special token when there is one; else add '<|pad|>' and return True: the
    caller must then resize the model's embeddings."""
    if tokenizer.eos_token is None:
        raise DataError(f"{tokenizer.name_or_path}: the tokenizer has no EOS token")
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return False
    for token in (tokenizer.unk_token, tokenizer.bos_token):
        if token is not None and token != tokenizer.eos_token:
            tokenizer.pad_token = token
            return False
    tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    return True


def _as_messages(prompt):
    return prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]


def encode_prompt(tokenizer, prompt):
    """Token ids of a prompt (a string or a list of chat messages), through the chat template when
    the tokenizer has one, ending where the assistant's reply begins. Without a template an empty prompt is
    the BOS token (EOS without one): generation, and the reward model's prompt pass, need one token."""
    if tokenizer.chat_template:
        text = chat_text(tokenizer, _as_messages(prompt), add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    if not isinstance(prompt, str):
        raise DataError(f"chat messages, but {tokenizer.name_or_path} has no chat template to write them")
    ids = without_appended_eos(tokenizer, tokenizer(prompt, add_special_tokens=True)["input_ids"])
    return ids or [tokenizer.eos_token_id if tokenizer.bos_token_id is None else tokenizer.bos_token_id]


def without_appended_eos(tokenizer, ids):
    """`ids` less the EOS a tokenizer appends to every text (Llama's add_eos_token=True): a prompt ends no
    episode, a reply cut off at the token limit did not end. An EOS the text spells stays, once."""
    if ids[-1:] == [tokenizer.eos_token_id] and appends_eos(tokenizer):
        return ids[:-1]
    return ids


def appends_eos(tokenizer):
    """Whether the tokenizer appends EOS to every text it encodes with special tokens."""
    return tokenizer("a", add_special_tokens=True)["input_ids"][-1:] == [tokenizer.eos_token_id]


def encode_pair(tokenizer, prompt, response, ended=True, generated=False):
    """(prompt_ids, response_ids) with EOS ending the response. With a chat template the response is
    the assistant turn exactly as the template writes it after the generation prompt. ended=False: a
    response cut off at the token limit, encoded as it was generated, with no end of turn and no EOS.
    generated=True (what a policy wrote, `score_texts`): see `generated_reply`."""
    prompt_ids = encode_prompt(tokenizer, prompt)
    if generated and spells_special_token(tokenizer, response):
        return prompt_ids, generated_reply(tokenizer, prompt, response, ended)
    if not tokenizer.chat_template:  # plain text
        response_ids = ids_after(tokenizer, prompt, prompt_ids, response, special_tokens=True)
        return prompt_ids, ending_with_eos(response_ids, tokenizer) if ended else response_ids
    head = chat_text(tokenizer, _as_messages(prompt), add_generation_prompt=True)
    if not ended:  # as generated (cut off): no end of turn, no EOS
        return prompt_ids, ids_after(tokenizer, head, prompt_ids, response)
    full = chat_text(tokenizer, _as_messages(prompt) + [{"role": "assistant", "content": response}])
    if not full.startswith(head):
        raise DataError(f"{tokenizer.name_or_path}: chat template output does not extend the prompt")
    response_ids = ids_after(tokenizer, head, prompt_ids, full[len(head):])
    closed = tokenizer.eos_token in end_of_turn(tokenizer, prompt)  # the template's end of turn holds EOS
    # (ChatML: <|im_end|>), not just the reply's text (Qwen2.5 base: turns end <|im_end|>, EOS <|endoftext|>)
    return prompt_ids, response_ids + ([] if closed else [tokenizer.eos_token_id])


def end_of_turn(tokenizer, prompt):
    """The text the chat template writes after an assistant's reply to `prompt` (ChatML: "<|im_end|>\n")."""
    turn = chat_text(tokenizer, _as_messages(prompt) + [{"role": "assistant", "content": "REPLY"}])
    return turn.rpartition("REPLY")[2]


def stop_token_ids(tokenizer):
    """The ids that end a reply: EOS, then any other added token (the template's markup, not text) in the
    chat template's end of turn: Gemma's <end_of_turn>, Phi-3's <|end|>, Qwen2.5 base's <|im_end|>; none for
    ChatML with EOS <|im_end|>. Such a model ends its turn there: sampling that stops only at EOS runs on to
    the cap."""
    ids = [tokenizer.eos_token_id]
    if tokenizer.chat_template:
        ids += [i for i in tokenizer(end_of_turn(tokenizer, "?"), add_special_tokens=False)["input_ids"]
                if i in tokenizer.added_tokens_decoder and i not in ids]
    return ids


def spells_special_token(tokenizer, text):
    """Whether `text` holds a special token's string, which encoding reads as that token."""
    return any(t.special and t.content in text for t in tokenizer.added_tokens_decoder.values())


def generated_reply(tokenizer, prompt, response, ended):
    """The ids of a reply a policy generated that spells a special token's string from ordinary tokens (a
    policy may write "<|im_end|>" so): those strings read as text, as generated, not as the special tokens
    (which could end its turn early in the reward model's eyes); then, if it ended, the template's end of turn
    and EOS, as `encode_pair` ends a reply. Encoded alone: a SentencePiece reply gets a leading space."""
    ids = tokenizer(response, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    if not ended:
        return ids
    end = end_of_turn(tokenizer, prompt) if tokenizer.chat_template else ""
    closing = tokenizer(end, add_special_tokens=False)["input_ids"]  # [] for ""
    return ids + closing + ([] if tokenizer.eos_token in end else [tokenizer.eos_token_id])


def ids_after(tokenizer, head, head_ids, tail, special_tokens=False):
    """The ids of text `tail` as the tokenizer reads it after text `head` (encoded as `head_ids`). Encoded
    alone it may read otherwise: SentencePiece tokenizers (Llama 2, Mistral) mark a word start on the first
    piece of any text, so a reply alone would begin with a "\u2581" (a space) that it lacks after its prompt.
    Alone only where head + tail do not encode as head_ids + something (a token across the boundary).
    special_tokens: a BOS as head_ids have, and not the EOS some tokenizers append."""
    ids = tokenizer(head + tail, add_special_tokens=special_tokens)["input_ids"]
    if special_tokens:
        ids = without_appended_eos(tokenizer, ids)
    if ids[:len(head_ids)] == head_ids:
        return ids[len(head_ids):]
    return tokenizer(tail, add_special_tokens=False)["input_ids"]


def decode_response(tokenizer, prompt_ids, response_ids):
    """A response's text as it reads after its prompt (special tokens skipped): decoded with the prompt, whose
    text is then cut off. Decoded alone, a SentencePiece response loses the space it starts with ("\u2581I"
    -> "I", Llama 2, Mistral), and `encode_pair` would give the reward model other tokens than generated."""
    head = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    whole = tokenizer.decode(prompt_ids + response_ids, skip_special_tokens=True)  # lists of ids
    if whole.startswith(head):
        return whole[len(head):]
    return tokenizer.decode(response_ids, skip_special_tokens=True)  # a clean-up rewrote the boundary


def ending_with_eos(ids, tokenizer):
    """ids with EOS after them, unless they end with it already: an EOS inside the text does not end it."""
    return ids if ids[-1:] == [tokenizer.eos_token_id] else ids + [tokenizer.eos_token_id]


def check_prompts(tokenizer, prompts, replies=True):
    """Raise a DataError if the tokenizer cannot write one of the prompts (its chat template refuses it, or
    chat messages without a template), with a reply after it (a reward model's) or alone (a policy's)."""
    for prompt in prompts:
        try:
            encode_pair(tokenizer, prompt, "") if replies else encode_prompt(tokenizer, prompt)
        except DataError as e:
            raise DataError(f"{e}; the prompt: {str(prompt)[:80]!r}") from None


def chat_text(tokenizer, messages, add_generation_prompt=False):
    """The chat template's text. A template that refuses the messages (a system turn, roles that do not
    alternate) or fails on them (a template is a program: any error) is a DataError."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as e:  # TemplateError: the template's own raise_exception(), whose message says why
        why = str(e) if isinstance(e, TemplateError) else f"{type(e).__name__}: {e}"
        raise DataError(f"{tokenizer.name_or_path}'s chat template refuses these messages ({why})") from None


def is_chat(value):
    """A non-empty list of {role, content} messages."""
    return isinstance(value, list) and value != [] and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value)


def _text(row, column):
    """row[column] if it is a string (a prompt may also be a list of chat messages), else a DataError."""
    value = row.get(column)
    if column == "messages":
        if is_chat(value):
            return value
        raise DataError(f"column 'messages' is {reprlib.repr(value)}; expected a list of {{role, content}} "
                        f"messages")
    if isinstance(value, str) or (column == "prompt" and is_chat(value)):
        return value
    raise DataError(f"column {column!r} is {reprlib.repr(value)}; expected text")  # a long value: its start


def reply_ended(row, reply):
    """row[reply + "_ended"]: False for a reply cut off at a token limit; absent or null: True."""
    value = row.get(f"{reply}_ended")
    if value is None:
        return True
    if not isinstance(value, bool):
        raise DataError(f"column '{reply}_ended' is {value!r}; expected true or false")
    return value


def _sft_pair(row):
    """(prompt, reply, whether the reply ended: False where its column's mark says cut off); prompt None
    for a plain text row, which has none."""
    if row.get("messages") is not None:  # a file may mix {messages}, {text} and {prompt, response} rows
        *prompt, last = _text(row, "messages")
        if last["role"] != "assistant":  # the reply to learn is the assistant's
            raise DataError(f"the last of 'messages' is a {last['role']} message; expected the assistant's")
        if not prompt:  # transformers' templates write no empty conversation, so no prompt to end
            raise DataError("'messages' holds the assistant's message alone; expected a turn before it "
                            "(for plain text, a {text} row)")
        return prompt, last["content"], True
    if row.get("text") is not None and row.get("prompt") is None:  # beside a prompt, text is not the reply
        return None, _text(row, "text"), True
    if "prompt" not in row:  # a {messages} or {text} file whose field is null in this row: _text raises
        return None, _text(row, "messages" if "messages" in row else "text"), True
    if "response" not in row and "chosen" not in row:  # e.g. {prompt, text}: text beside a prompt is no reply
        raise DataError("a row with a 'prompt' needs its reply in 'response' (or 'chosen'); 'text' is read "
                        "only in rows without a prompt")
    reply = "response" if row.get("response") is not None or "chosen" not in row else "chosen"
    return _text(row, "prompt"), _text(row, reply), reply_ended(row, reply)


def encode_sft(row, tokenizer, max_length):
    """{input_ids, labels, cut, hash}: prompt tokens labelled -100, truncated on the right to max_length (cut:
    it had more; hash: `prompt_hash`, of a plain text row its text); None for an empty response or when
    truncation would leave no response token (the caller drops and counts it). A reply marked cut off
    (`response_ended` or `chosen_ended` false) gets no EOS: it did not end there."""
    prompt, response, ended = _sft_pair(row)
    if not response.strip():
        return None
    if prompt is None:  # plain text: every token is a label, no chat template
        prompt_ids, response_ids = [], ending_with_eos(tokenizer(response)["input_ids"], tokenizer)
    else:
        prompt_ids, response_ids = encode_pair(tokenizer, prompt, response, ended)
    ids = (prompt_ids + response_ids)[:max_length]
    if len(ids) <= len(prompt_ids):
        return None
    return {"input_ids": ids, "labels": [-100] * len(prompt_ids) + ids[len(prompt_ids):],
            "cut": len(prompt_ids) + len(response_ids) > max_length,
            "hash": prompt_hash(response if prompt is None else prompt)}


def encode_preference(row, tokenizer, max_length, keep="end"):
    """{prompt, chosen, rejected} ids, each reply ending with EOS, or as generated if the row marks it cut off
    at a token limit (`chosen_ended` or `rejected_ended` false): scored as PPO scores it. The replies keep
    their last max_length - 1 tokens, where a reward model reads its score (keep="start": their first, for
    DPO, whose log-probs of a reply's start are the policy's on real text), and the prompt its last tokens
    that fit beside the longer reply (`last_tokens`; one at least, so every pair makes the same forward calls,
    as ZeRO-3 needs): both replies are judged in the same context. `cut`: the prompt or a reply lost tokens;
    `hash`: `prompt_hash`. None for an empty reply, or replies alike (as text, or once cut): no preference to
    learn, a loss of log 2, no gradient."""
    prompt_text, chosen_text, rejected_text = (_text(row, column) for column in ("prompt", *REPLIES))
    if not (chosen_text.strip() and rejected_text.strip()):
        return None
    prompt, chosen = encode_pair(tokenizer, prompt_text, chosen_text, reply_ended(row, "chosen"))
    rejected = encode_pair(tokenizer, prompt_text, rejected_text, reply_ended(row, "rejected"))[1]
    longest = len(prompt) + max(len(chosen), len(rejected))  # past max_length: the prompt or a reply is cut
    kept = slice(-(max_length - 1), None) if keep == "end" else slice(max_length - 1)  # max_length >= 2
    chosen, rejected = chosen[kept], rejected[kept]
    if chosen == rejected:
        return None
    room = max_length - max(len(chosen), len(rejected))  # for the prompt
    return {"prompt": last_tokens(prompt, room, tokenizer), "chosen": chosen, "rejected": rejected,
            "cut": longest > max_length, "hash": prompt_hash(prompt_text)}


def encode_rl_prompt(row, tokenizer, max_length):
    """{prompt, input_ids, cut}: the prompt as given, text or chat messages (for reward functions), and its
    ids, keeping the last max_length (`last_tokens`; cut: it had more)."""
    prompt = _text(row, "prompt")
    ids = encode_prompt(tokenizer, prompt)
    kept = last_tokens(ids, max_length, tokenizer)
    return {"prompt": prompt, "input_ids": kept, "cut": len(ids) > max_length}


def last_tokens(ids, n, tokenizer):
    """The last n >= 1 of `ids`, as a sequence cut on the left keeps them, but the BOS that the tokenizer
    starts every text with (Llama's, Gemma's) stays first: such models read text without it as something
    else. A BOS that only opens a turn (ChatML's <|im_start|>, SmolLM2's BOS) goes with the turn's start."""
    if len(ids) <= n:
        return ids
    bos = ids[:1] if ids[0] == tokenizer.bos_token_id and starts_with_bos(tokenizer) else []
    return bos + ids[len(ids) - n + len(bos):]


def starts_with_bos(tokenizer):
    """Whether the tokenizer puts its BOS before every text it encodes."""
    return tokenizer.bos_token_id is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]


ENCODERS = {"sft": encode_sft, "rm": encode_preference,
            "dpo": functools.partial(encode_preference, keep="start"),  # long replies: their starts
            **dict.fromkeys(ONLINE, encode_rl_prompt)}


def tokenize(rows, stage, tokenizer, max_length):
    """Encode every row for the stage -> (examples, number of rows dropped: an empty reply, none of it
    within max_length, or a pair's replies alike). A field that is not text is a DataError naming its row
    (1-based) and column."""
    examples = []
    for number, row in enumerate(rows, 1):
        try:
            examples.append(ENCODERS[stage](row, tokenizer, max_length))
        except DataError as e:
            raise DataError(f"row {number}: {e}") from None
    kept = [e for e in examples if e is not None]
    return kept, len(examples) - len(kept)


def prompt_hash(prompt):
    """A number in [0, 1) from the sha256 of a prompt's chat messages as JSON (a text prompt: one user turn):
    where `held_out` puts its rows, the same in every stage, file and run, whatever other rows are dropped."""
    digest = hashlib.sha256(json.dumps(_as_messages(prompt), sort_keys=True).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def held_out(examples, fraction):
    """-> (train, held out): the examples whose prompt hashes below `fraction` held out (about that share of
    the prompts, not a file's last rows: one subset of HH's, SHP's last subreddits), the rest trained on. A
    prompt's rows, pairs or replies, stay together, and on the side they are in the other stages: a reward
    model is not evaluated on rows that the SFT model it starts from learnt. (A file of few distinct prompts
    holds out few or all: `load_examples` says so.)"""
    return [e for e in examples if e["hash"] >= fraction], [e for e in examples if e["hash"] < fraction]


def sequence_length(example):
    """Tokens of an example's longest sequence: its prompt and longer reply (a pair), else its input_ids."""
    if "chosen" in example:
        return len(example["prompt"]) + max(len(example[k]) for k in REPLIES)
    return len(example["input_ids"])


def pad(seqs, value, left=False):
    """Lists of ids -> (B, T) tensor, padded on the right (or the left) with value."""
    width = max(map(len, seqs))
    fills = [[value] * (width - len(s)) for s in seqs]
    return torch.tensor([fill + s if left else s + fill for fill, s in zip(fills, seqs)])


def pad_with_mask(seqs, pad_id, left=False):
    """-> ids (B, T) padded with pad_id, and the attention mask (B, T): 1 on tokens, 0 on padding."""
    return pad(seqs, pad_id, left), pad([[1] * len(s) for s in seqs], 0, left)


def collate_sft(batch, pad_id):
    """Right-padded (B, T) ids, attention mask and labels (-100 on padding, as on the prompt)."""
    ids, mask = pad_with_mask([b["input_ids"] for b in batch], pad_id)  # (B, T) each
    return {"input_ids": ids, "attention_mask": mask, "labels": pad([b["labels"] for b in batch], -100)}


def padded_size(group):
    """Tokens that a group of pairs takes padded together: its prompts and both replies of each pair."""
    replies = max(len(b[k]) for b in group for k in REPLIES)
    return len(group) * (max(len(b["prompt"]) for b in group) + 2 * replies)


def collate_pairs(batch, pad_id, slack=0.25):
    """Pairs in groups for `pair_scores` and `reply_logprobs`, each of B pairs {prompt_ids (B, P) left-padded,
    reply_ids (2B, R) right-padded (chosen 0, rejected 0, chosen 1, ...), attention_mask (2B, P+R)}. Sorted
    by prompt length, a pair joins the group before it while the group's padded size stays within 1 + slack
    of its pairs' sizes alone: similar pairs share larger matmuls, unlike ones (most of HH-RLHF) are not
    padded together.
    slack=None: one pair per group, as ZeRO-3 across ranks needs (every rank makes the same forwards)."""
    groups = []
    for b in sorted(batch, key=lambda b: len(b["prompt"])):
        if groups and slack is not None:
            joined = groups[-1] + [b]
            if padded_size(joined) <= (1 + slack) * sum(padded_size([x]) for x in joined):
                groups[-1] = joined
                continue
        groups.append([b])
    return [collate_group(g, pad_id) for g in groups]


def collate_group(group, pad_id):
    """One group of `collate_pairs`: each prompt once, each of its replies after it in the mask."""
    prompt_ids, prompt_mask = pad_with_mask([b["prompt"] for b in group], pad_id, left=True)  # (B, P)
    reply_ids, reply_mask = pad_with_mask([b[k] for b in group for k in REPLIES], pad_id)  # (2B, R)
    return {"prompt_ids": prompt_ids, "reply_ids": reply_ids,
            "attention_mask": prompts_before_replies(prompt_mask, reply_mask)}  # (2B, P+R)


def prompts_before_replies(prompts, replies):
    """Each of B prompts before each of its two replies: (B, P), (2B, R) -> (2B, P + R). Ids or masks."""
    return torch.cat([prompts.repeat_interleave(2, 0), replies], 1)


def collate_prompts(batch, pad_id):
    """Left-padded (B, P) prompts, so every row's generation starts at column P."""
    ids, mask = pad_with_mask([b["input_ids"] for b in batch], pad_id, left=True)
    return {"input_ids": ids, "attention_mask": mask, "prompts": [b["prompt"] for b in batch]}


def to_device(batch, device):
    """A collated batch (or a list of pair groups) with its tensors on device."""
    if isinstance(batch, list):
        return [to_device(b, device) for b in batch]
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
