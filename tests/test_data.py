"""Loading, adapting, tokenizing and collating data."""
import gzip
import json
import math
import os
from argparse import Namespace

import datasets
import pytest
import torch
from tokenizers import processors

import minrlhf as M
import minrlhf.data as data
from minrlhf import (DataError, collate_pairs, collate_prompts, collate_sft, encode_pair, encode_preference,
                     encode_rl_prompt, encode_sft, ensure_pad_token, load_rows, split_hh, tokenize)
from minrlhf.data import check_columns, decode_response
from minrlhf.engine import init_distributed
from minrlhf.inputs import load_examples
from tiny import STRICT_TEMPLATE, make_sentencepiece_tokenizer, make_tokenizer

HH_FILE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "hh-rlhf-harmless-base-test.jsonl.gz")

# one row of each seed Hub dataset, in its published schema
HUB_ROWS = {
    "Anthropic/hh-rlhf": {"chosen": "\n\nHuman: Hi?\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi?\n\nAssistant: Go away."},
    "stanfordnlp/SHP": {"post_id": "x", "domain": "askculinary_train", "upvote_ratio": 0.9, "history": "How long to boil an egg?",
                        "c_root_id_A": "a", "c_root_id_B": "b", "created_at_utc_A": 1, "created_at_utc_B": 2, "score_A": 9,
                        "score_B": 2, "human_ref_A": "Nine minutes.", "human_ref_B": "lol", "labels": 1,
                        "seconds_difference": 1.0, "score_ratio": 4.5},
    "CarperAI/openai_summarize_tldr": {"prompt": "SUBREDDIT: r/cats\nTITLE: cat\nPOST: My cat sleeps all day.\nTL;DR:",
                                       "label": " lazy cat"},
    "CarperAI/openai_summarize_comparisons": {"prompt": "SUBREDDIT: r/cats\nTITLE: cat\nPOST: My cat sleeps all day.",
                                              "chosen": "TL;DR: my cat is lazy", "rejected": "TL;DR: dogs"},
    "fka/awesome-chatgpt-prompts": {"act": "Linux Terminal", "prompt": "I want you to act as a linux terminal."},
    "lvwerra/stack-exchange-paired": {"qid": 7, "question": "How do I undo a commit?\n", "date": "2012/03/01",
                                      "metadata": ["https://stackoverflow.com/questions/7"],
                                      "response_j": "Use `git revert`.", "response_k": " Delete the repo."},
}
EXPECTED = {
    "Anthropic/hh-rlhf": {"prompt": "\n\nHuman: Hi?\n\nAssistant:", "chosen": " Hello!", "rejected": " Go away."},
    "stanfordnlp/SHP": {"prompt": "How long to boil an egg?\n\n", "chosen": "Nine minutes.", "rejected": "lol"},
    "CarperAI/openai_summarize_tldr": {"prompt": HUB_ROWS["CarperAI/openai_summarize_tldr"]["prompt"], "response": " lazy cat"},
    "CarperAI/openai_summarize_comparisons": {"prompt": "SUBREDDIT: r/cats\nTITLE: cat\nPOST: My cat sleeps all day.\nTL;DR:",
                                              "chosen": " my cat is lazy", "rejected": " dogs"},
    "fka/awesome-chatgpt-prompts": {"prompt": "I want you to act as a linux terminal."},
    "lvwerra/stack-exchange-paired": {"prompt": "Question: How do I undo a commit?\n\nAnswer:",
                                      "chosen": " Use `git revert`.", "rejected": " Delete the repo."},
}


@pytest.mark.parametrize("name", list(HUB_ROWS))
def test_hub_adapters(name, monkeypatch):
    calls = []

    def fake_load_dataset(path, split, data_dir):  # stands in for the Hub: same call, the published schema
        calls.append((path, split, data_dir))
        return datasets.Dataset.from_list([HUB_ROWS[name]])
    monkeypatch.setattr(data.datasets, "load_dataset", fake_load_dataset)
    rows = load_rows(name, split="test")
    folder = "data/evaluation" if name == "lvwerra/stack-exchange-paired" else None  # eval.py's prompts
    assert calls == [(name, "test", folder)] and rows[0] == EXPECTED[name]


def test_stack_exchange_paired_reads_each_stage_its_own_folder_as_stackllama(monkeypatch):
    """StackLLaMA (Open-ChatGPT's example 3) fine-tuned, trained its reward model and ran PPO on three disjoint
    folders of the dataset (millions of pairs each): a stage loads its folder alone, not the whole dataset."""
    folders = []

    def fake_load_dataset(path, split, data_dir):
        folders.append(data_dir)
        return datasets.Dataset.from_list([HUB_ROWS["lvwerra/stack-exchange-paired"]])
    monkeypatch.setattr(data.datasets, "load_dataset", fake_load_dataset)
    for stage in ("sft", "rm", "dpo", "ppo", "grpo", "rloo"):
        load_rows("lvwerra/stack-exchange-paired", stage=stage)
    assert folders == ["data/finetune", "data/reward", "data/reward", "data/rl", "data/rl", "data/rl"]
    chat = load_rows("lvwerra/stack-exchange-paired", chat=True)[0]  # the question alone: the template asks it
    assert chat == {"prompt": "How do I undo a commit?", "chosen": "Use `git revert`.", "rejected": "Delete the repo."}


def test_hh_rlhf_for_a_chat_template_is_its_turns(monkeypatch):
    """For a tokenizer with a chat template, an HH transcript's turns become the model's own (as TRL converts
    hh-rlhf): no "Human:" text inside a user turn, replies without HH's leading space; the same template's
    text as a chat written by hand. Turns of one speaker in a row are joined (templates want them to alternate)."""
    transcript = "\n\nHuman: Hi?\n\nAssistant: Hello!\n\nHuman: Help me.\n\nHuman: Please?\n\nAssistant:"
    row = {"chosen": transcript + " Sure.", "rejected": transcript + " No."}
    monkeypatch.setattr(data.datasets, "load_dataset", lambda path, split, data_dir: datasets.Dataset.from_list([row]))
    chat = load_rows("Anthropic/hh-rlhf", chat=True)[0]
    turns = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello!"},
             {"role": "user", "content": "Help me.\n\nPlease?"}]
    assert chat == {"prompt": turns, "chosen": "Sure.", "rejected": "No."}
    assert load_rows("Anthropic/hh-rlhf")[0]["prompt"] == transcript  # no template: the text as it is
    init_distributed()  # a world of one: load_examples asks for its rank
    tok = make_tokenizer(chat_template=True)
    args = Namespace(dataset="Anthropic/hh-rlhf", stage="rm", max_length=256, eval_fraction=0.0, batch_size=1,
                     grad_accum=1)
    assert load_examples(args, tok)[0] == [encode_preference({**chat, "prompt": turns}, tok, 256)]  # as train.py


@pytest.mark.parametrize("name", ["stanfordnlp/SHP", "CarperAI/openai_summarize_tldr",
                                  "CarperAI/openai_summarize_comparisons"])
def test_hub_adapters_for_a_chat_template_strip_the_plain_text_spacing(name, monkeypatch):
    """The template writes the turns: no "\\n\\n" ending SHP's user turn, no space opening a TL;DR reply (a
    policy taught so would open every reply with one). TL;DR's cue stays: in a user turn it asks for the summary."""
    monkeypatch.setattr(data.datasets, "load_dataset", lambda path, split, data_dir: datasets.Dataset.from_list([HUB_ROWS[name]]))
    row = load_rows(name, chat=True)[0]
    assert row == {column: text.strip() for column, text in EXPECTED[name].items()}
    prompt, reply = row["prompt"], row.get("response", row.get("chosen"))
    assert not prompt[-1].isspace() and not reply[0].isspace() and prompt.endswith(("?", "TL;DR:"))
    tok = make_tokenizer(chat_template=True)
    assert tok.decode(sum(encode_pair(tok, prompt, reply), [])) == (f"<|im_start|>user\n{prompt}<|im_end|>\n"
                                                                   f"<|im_start|>assistant\n{reply}<|im_end|>\n")


def test_hub_failure_is_one_clear_line(monkeypatch):
    def offline(path, split, data_dir):
        raise ConnectionError("no network")
    monkeypatch.setattr(data.datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"^Anthropic/hh-rlhf: not a local file and not loadable .*ConnectionError"):
        load_rows("Anthropic/hh-rlhf")


@pytest.mark.parametrize("chat", [False, True])
def test_hh_transcripts_that_differ_before_the_last_reply_are_dropped_and_counted(chat, monkeypatch, capsys):
    """Their "reply" would carry the turns after it (the human's next one too), which SFT would teach the policy
    to write, and a reward model judge: such a row is dropped and counted with the rows of empty replies."""
    rows = [{"chosen": "\n\nHuman: hi\n\nAssistant: Hello!\n\nHuman: thanks!\n\nAssistant: you are welcome.",
             "rejected": "\n\nHuman: hi\n\nAssistant: Hello!\n\nHuman: tell me a joke.\n\nAssistant: no."},
            {"chosen": "\n\nHuman: a\n\nAssistant: b\n\nAssistant: c", "rejected": "\n\nHuman: a\n\nAssistant: d"},
            HUB_ROWS["Anthropic/hh-rlhf"]]
    assert split_hh(rows[1]) == {"prompt": "\n\nHuman: a\n\nAssistant:", "chosen": "", "rejected": ""}
    monkeypatch.setattr(data.datasets, "load_dataset", lambda path, split, data_dir: datasets.Dataset.from_list(rows))
    init_distributed()  # a world of one: load_examples asks for its rank
    tok = make_tokenizer(chat_template=chat)
    for stage in ("sft", "rm", "dpo"):
        args = Namespace(dataset="Anthropic/hh-rlhf", stage=stage, max_length=64, eval_fraction=0.0, batch_size=1,
                         grad_accum=1)
        assert len(load_examples(args, tok)[0]) == 1
        assert ("Anthropic/hh-rlhf: dropped 2 of 3 rows: an empty reply (hh-rlhf: transcripts that differ before "
                "the last reply)") in capsys.readouterr().out


def test_hh_split_keeps_the_earlier_turns_in_the_prompt():
    row = {"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d",
           "rejected": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: e"}
    assert split_hh(row) == {"prompt": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:", "chosen": " d",
                             "rejected": " e"}


@pytest.mark.skipif(not os.path.exists(HH_FILE), reason="shared HH-RLHF file absent")
def test_hh_adapter_on_real_rows():
    with gzip.open(HH_FILE, "rt") as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 2312
    dropped = 0
    for row in rows:
        out = split_hh(row)
        assert out["prompt"].endswith("\n\nAssistant:") and out["prompt"].startswith("\n\nHuman:")
        if out["chosen"] == out["rejected"] == "":  # transcripts that differ before the last reply
            dropped += 1
        else:
            assert out["prompt"] + out["chosen"] == row["chosen"] and out["prompt"] + out["rejected"] == row["rejected"]
    assert dropped == 5


ROWS = [{"prompt": "is it good?", "chosen": " yes", "rejected": " no"}, {"prompt": "hi", "chosen": " hey", "rejected": " bye"}]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".jsonl.gz", ".json.gz"])
def test_local_formats(tmp_path, suffix):
    path = str(tmp_path / f"rows{suffix}")
    if ".parquet" in suffix:
        datasets.Dataset.from_list(ROWS).to_parquet(path)
    else:
        text = "\n".join(map(json.dumps, ROWS)) if ".jsonl" in suffix else json.dumps(ROWS)
        with (gzip.open if suffix.endswith(".gz") else open)(path, "wt") as f:
            f.write(text)
    assert load_rows(path).to_list() == ROWS


def write(tmp_path, name, text):
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return str(path)


@pytest.mark.parametrize("name,text,message", [
    ("bad.jsonl", '{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": oops}\n', r"bad\.jsonl: line 3: malformed JSON"),
    ("bad.json", '[\n{"prompt": "a"},\n{"prompt" "b"}\n]', r"bad\.json: line 3: malformed JSON"),
    ("rows.csv", "prompt\nhi\n", r"rows\.csv: unknown file type; expected \.jsonl, \.json or \.parquet"),
    ("rows.parquet.gz", "x", r"rows\.parquet\.gz: unknown file type; expected \.jsonl, \.json or \.parquet \(the "
                            r"first two optionally \.gz\)"),
    ("empty.jsonl", "", r"empty\.jsonl: the data set is empty"),
    ("blank.jsonl", "\n\n", r"blank\.jsonl: the data set is empty"),  # datasets: "Instruction "train" ...
    ("list.json", "[]", r"list\.json: the data set is empty"),  # ... corresponds to no data!"
    ("number.json", "5", r"number\.json: line 1: a JSON int; expected a list of objects"),
    ("null.jsonl", '\nnull\n{"prompt": "a"}\n', r"null\.jsonl: its first record is null; expected an object per line"),
    ("null.json", '[null, {"prompt": "a"}]', r"null\.json: its first record is null"),  # datasets: SIGSEGV
    ("null_alone.json", "null", r"null_alone\.json: its first record is null"),
    ("twice.jsonl", '{"prompt": "a", "prompt": "b"}\n', r"twice\.jsonl: JSON parse error: Column\(/prompt\) was "
                                                      r"specified twice"),  # datasets' cause, not its wrapper's line
    ("cut.jsonl.gz", gzip.compress(b'{"prompt": "a"}\n' * 100, mtime=0)[:30], r"cut\.jsonl\.gz: cannot read it as UTF-8 text "
                                                                    r"\(Compressed file ended"),
])
def test_bad_files(tmp_path, name, text, message):
    with pytest.raises(DataError, match=message):
        load_rows(write(tmp_path, name, text))
    with pytest.raises(DataError, match=r"missing\.jsonl: no such file"):
        load_rows(str(tmp_path / "missing.jsonl"))


@pytest.mark.parametrize("rows, column", [
    ([{"prompt": [{"role": "user", "content": "hi"}]}, {"prompt": '"Translate: good morning"'}], "prompt"),
    ([{**ROWS[0], "chosen_ended": "false"}, {**ROWS[1], "chosen_ended": True}], "chosen_ended"),
])
def test_a_column_of_mixed_kinds_is_refused(tmp_path, rows, column):
    """datasets types such a column Json and reads any text in it that parses as JSON as that JSON: the prompt
    '"Translate: good morning"' would lose its quotes, "false" pass for false. A column no stage reads may mix."""
    path = write(tmp_path, "mixed.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=rf"^.*mixed\.jsonl: column '{column}' mixes kinds of values \(text with chat "
                                        rf"messages, numbers or true/false\); use one kind per file$"):
        load_rows(path)
    ids = write(tmp_path, "ids.jsonl", "".join(json.dumps({**r, "id": i}) + "\n" for r, i in zip(ROWS, [5, "a"])))
    assert load_rows(ids)["id"] == [5, "a"]


def test_a_file_name_is_not_a_pattern(tmp_path):
    """datasets reads data_files as glob patterns: "pairs[v2].jsonl" would match pairs2.jsonl, not itself."""
    write(tmp_path, "pairs2.jsonl", json.dumps({"prompt": "another file"}))
    assert load_rows(write(tmp_path, "pairs[v2].jsonl", json.dumps(ROWS[0]))).to_list() == [ROWS[0]]


def test_missing_columns_named(tmp_path):
    rows = load_rows(write(tmp_path, "r.jsonl", '{"question": "a", "answer": "b"}\n'))
    with pytest.raises(DataError, match=r"--stage rm needs columns \{prompt, chosen, rejected\}; found \['question', 'answer'\]"):
        check_columns(rows, "rm", "r.jsonl")
    check_columns(load_rows(write(tmp_path, "p.jsonl", json.dumps(ROWS[0]))), "sft", "p.jsonl")  # prompt + chosen


def test_sft_labels_mask_prompt_and_end_with_eos():
    tok = make_tokenizer()
    ex = encode_sft({"prompt": "is it good?", "response": " yes, absolutely."}, tok, 64)
    prompt_len = len(tok("is it good?")["input_ids"])
    assert ex["labels"][:prompt_len] == [-100] * prompt_len
    assert ex["labels"][prompt_len:] == ex["input_ids"][prompt_len:]
    assert ex["input_ids"][-1] == tok.eos_token_id and ex["labels"][-1] == tok.eos_token_id
    assert tok.decode(ex["input_ids"][prompt_len:-1]) == " yes, absolutely."


def test_shp_labels_say_which_comment_is_chosen():
    """SHP's labels: 1, comment A preferred; 0, comment B."""
    row = {**HUB_ROWS["stanfordnlp/SHP"], "labels": 0}
    assert data.HUB_CONVERTERS["stanfordnlp/SHP"](row) == {**EXPECTED["stanfordnlp/SHP"], "chosen": "lol",
                                                         "rejected": "Nine minutes."}


def test_sft_eos_survives_when_pad_was_eos():
    tok = make_tokenizer(pad_is_eos=True)
    ensure_pad_token(tok)
    batch = collate_sft([encode_sft({"prompt": "a", "response": " b"}, tok, 64),
                         encode_sft({"prompt": "hello there", "response": " a longer reply"}, tok, 64)], tok.pad_token_id)
    labels = batch["labels"]
    assert (labels == tok.eos_token_id).sum(1).tolist() == [1, 1]  # the real EOS is a label in both rows
    assert (batch["input_ids"][batch["attention_mask"] == 0] == tok.pad_token_id).all()
    assert (labels[batch["attention_mask"] == 0] == -100).all()


def test_sft_chat_template_messages_and_text_rows():
    tok = make_tokenizer(chat_template=True)
    ex = encode_sft({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}, tok, 64)
    prompt_len = ex["labels"].count(-100)
    assert tok.decode(ex["input_ids"][:prompt_len]) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(ex["input_ids"][prompt_len:]) == "hello<|im_end|>\n"
    assert encode_sft({"prompt": "hi", "response": "hello"}, tok, 64) == ex
    text = encode_sft({"text": "the film was great"}, make_tokenizer(), 64)
    assert -100 not in text["labels"] and text["input_ids"][-1] == make_tokenizer().eos_token_id
    # an empty prompt is still a prompt: the template's empty user turn, as rm, dpo and ppo encode it
    empty = encode_sft({"prompt": "", "response": "hello"}, tok, 64)
    prompt_ids, reply_ids = encode_pair(tok, "", "hello")
    assert empty == {"input_ids": prompt_ids + reply_ids, "labels": [-100] * len(prompt_ids) + reply_ids, "cut": False,
                     "hash": data.prompt_hash("")}
    assert tok.decode(prompt_ids) == "<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat template"])
def test_a_reply_is_encoded_as_it_reads_after_its_prompt(chat):
    """A SentencePiece tokenizer (Llama 2, Mistral) starts every text it encodes with a word-start mark: a
    reply encoded alone would begin with one it lacks after its prompt. encode_pair: the whole text's ids."""
    tok = make_sentencepiece_tokenizer(chat_template=chat)
    prompt, reply = "how are you today?", "I am fine, thank you."
    if chat:
        whole = tok.apply_chat_template([{"role": "user", "content": prompt},
                                         {"role": "assistant", "content": reply}], tokenize=False)
        whole_ids = tok(whole, add_special_tokens=False)["input_ids"]  # ends <|im_end|> "\n"
        cut_off = tok(whole[:whole.index(reply) + len(reply)], add_special_tokens=False)["input_ids"]
    else:
        whole_ids = tok(f"{prompt} {reply}")["input_ids"] + [tok.eos_token_id]
        cut_off, reply = whole_ids[:-1], f" {reply}"
    prompt_ids, reply_ids = encode_pair(tok, prompt, reply)
    assert prompt_ids + reply_ids == whole_ids
    assert reply_ids[0] != tok(reply, add_special_tokens=False)["input_ids"][0]  # alone: another first token
    assert sum(encode_pair(tok, prompt, reply, ended=False), []) == cut_off


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat template"])
def test_a_generated_response_decodes_to_the_text_that_encodes_back_to_it(chat):
    """PPO scores decoded text, re-encoded after its prompt (`encode_pair`): the reward model must read the
    tokens the policy generated. Decoded alone, a SentencePiece response loses its leading space."""
    tok = make_sentencepiece_tokenizer(chat_template=chat)
    prompt, reply = "how are you today?", " I am fine, thank you."
    prompt_ids, scored = encode_pair(tok, prompt, reply)  # as the reward model reads the reply
    generated = scored[:scored.index(tok.eos_token_id) + 1]  # sampling stops at EOS (ChatML: "\n" follows)
    padded = [tok.pad_token_id] * 2 + prompt_ids  # left-padded, as in a rollout
    assert encode_pair(tok, prompt, decode_response(tok, padded, generated)) == (prompt_ids, scored)
    cut = generated[:3]  # cut off at the token cap
    assert encode_pair(tok, prompt, decode_response(tok, padded, cut), ended=False) == (prompt_ids, cut)
    alone = tok.decode(generated, skip_special_tokens=True)  # the reason: " I am" -> "I am"
    assert encode_pair(tok, prompt, alone)[1] != scored


def test_eos_follows_a_turn_end_that_is_not_eos_even_when_the_reply_holds_one():
    """Qwen2.5 base's layout: ChatML turns (<|im_end|>), EOS <|endoftext|>. A reply is closed by EOS after the
    template's end of turn; an EOS in the reply's text does not count as that."""
    tok = make_tokenizer(chat_template=True)
    tok.eos_token = "<|endoftext|>"
    end_of_turn = tok("<|im_end|>\n", add_special_tokens=False)["input_ids"]
    for reply in ("the film was great", "the film <|endoftext|> was great"):
        assert encode_pair(tok, "hi", reply)[1][-3:] == end_of_turn + [tok.eos_token_id]


def test_stop_token_ids_are_eos_and_the_markup_ending_a_turn():
    """Replies end at EOS, and at the template's end of turn where that is another added token (Qwen2.5 base,
    Gemma, Phi-3): the newline after <|im_end|> is text, and ChatML with EOS <|im_end|> adds nothing."""
    assert data.stop_token_ids(make_tokenizer()) == [make_tokenizer().eos_token_id]
    chatml = make_tokenizer(chat_template=True)
    assert data.stop_token_ids(chatml) == [chatml.convert_tokens_to_ids("<|im_end|>")]
    chatml.eos_token = "<|endoftext|>"
    assert data.stop_token_ids(chatml) == [chatml.eos_token_id, chatml.convert_tokens_to_ids("<|im_end|>")]


def test_a_tokenizer_that_appends_eos_ends_no_prompt_with_it():
    """Llama tokenizers saved with add_eos_token=True append EOS to every text: the prompt must not end with it
    (the policy would answer after an EOS), and the reply still reads as after its prompt, EOS once."""
    tok = make_sentencepiece_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", tok.bos_token_id), ("</s>", tok.eos_token_id)])
    prompt_ids, reply_ids = encode_pair(tok, "how are you today?", " I am fine")
    assert prompt_ids + reply_ids == tok("how are you today? I am fine")["input_ids"]  # <s> ... </s>
    assert prompt_ids[-1] != tok.eos_token_id and reply_ids.count(tok.eos_token_id) == 1


def test_a_text_that_spells_eos_keeps_one_eos_with_a_tokenizer_that_appends_one():
    """A prompt or reply whose text ends with "</s>" reads it as EOS; a tokenizer that appends EOS adds a second,
    which must go: one EOS ends the reply, and the prompt ends with the one it spells."""
    tok = make_sentencepiece_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", tok.bos_token_id), ("</s>", tok.eos_token_id)])
    eos = tok.eos_token_id
    prompt_ids, reply_ids = encode_pair(tok, "how are you today?", " I am fine</s>")
    assert reply_ids.count(eos) == 1 and reply_ids[-1] == eos
    assert encode_pair(tok, "how are you today?", " I am fine</s>", ended=False)[1].count(eos) == 1
    assert encode_pair(tok, "how are you today?</s>", " I am fine")[0][-2:] != [eos, eos]


def test_a_tokenizer_that_appends_eos_ends_no_cut_off_reply_with_it():
    """A reply cut off at the token limit did not end: with a tokenizer that appends EOS to every text, it must
    still reach the reward model (online, and in its pairs) and SFT's labels without one; an ended one, once."""
    tok = make_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="$A <|endoftext|>", special_tokens=[("<|endoftext|>", tok.eos_token_id)])
    eos = tok.eos_token_id
    for generated in (False, True):
        assert encode_pair(tok, "the film was", " great", ended=False, generated=generated)[1][-1] != eos
        assert encode_pair(tok, "the film was", " great", generated=generated)[1].count(eos) == 1
    row = {"prompt": "the film was", "response": " great and the food", "response_ended": False}
    assert eos not in encode_sft(row, tok, 64)["labels"]
    pair = encode_preference({"prompt": "the film was", "chosen": " great", "rejected": " bad and the",
                              "rejected_ended": False}, tok, 64)
    assert pair["chosen"].count(eos) == 1 and eos not in pair["rejected"]


def test_sft_truncation_keeps_the_start_and_labels_the_response():
    tok = make_tokenizer()
    prompt_ids, response_ids = encode_pair(tok, "the film was", " great, I loved it and the food was great")
    example = encode_sft({"prompt": "the film was", "response": " great, I loved it and the food was great"}, tok, 8)
    assert example["input_ids"] == (prompt_ids + response_ids)[:8]
    assert example["labels"] == [-100] * len(prompt_ids) + response_ids[:8 - len(prompt_ids)]


def test_a_pairs_length_is_its_prompt_and_longer_reply():
    tok = make_tokenizer()
    pair = encode_preference({"prompt": "hi", "chosen": " yes", "rejected": " no, the film was awful"}, tok, 64)
    assert data.sequence_length(pair) == len(pair["prompt"]) + len(pair["rejected"])


def test_an_empty_prompt_is_the_bos_token():
    """Generation and the reward model's prompt pass need a token: BOS, where the tokenizer has one."""
    tok = make_tokenizer()
    tok.add_special_tokens({"bos_token": "<s>"})  # a BOS of its own, which this tokenizer does not add
    assert data.encode_prompt(tok, "") == [tok.bos_token_id] != [tok.eos_token_id]


def test_truncation_drops_rows_without_response_and_counts_them():
    tok = make_tokenizer()
    rows = [{"prompt": "the film was great " * 10, "response": " yes"}, {"prompt": "hi", "response": " the film was great " * 10}]
    examples, dropped = tokenize(rows, "sft", tok, 12)
    assert dropped == 1 and len(examples) == 1 and len(examples[0]["input_ids"]) == 12
    assert any(label != -100 for label in examples[0]["labels"])
    exactly = len(tok("the film was great")["input_ids"])  # a prompt that fills max_length: no response token
    assert tokenize([{"prompt": "the film was great", "response": " yes"}], "sft", tok, exactly) == ([], 1)


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo"])
def test_rows_cut_to_max_length_are_counted(stage, tmp_path, capsys):
    """As the online stages count the prompts they cut: a line counts the rows learnt or judged from less than
    they hold (a reply's part, a prompt's end), on rank 0; none where every row fits."""
    init_distributed()  # a world of one: load_examples asks for its rank
    tok = make_tokenizer()
    long = {"prompt": "hi", "chosen": " the film was great" * 20, "rejected": " awful"}
    for rows in (ROWS, ROWS + [long]):
        path = write(tmp_path, "rows.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        args = Namespace(dataset=path, stage=stage, max_length=32, eval_fraction=0.0, batch_size=1, grad_accum=1)
        load_examples(args, tok)
        out = capsys.readouterr().out
        line = "rows.jsonl: 1 of 3 rows longer than --max-length 32: their prompts or replies cut to fit"
        assert (line in out) if long in rows else ("longer than --max-length" not in out)
    prompt = {"prompt": "the film was great " * 20, "chosen": " yes", "rejected": " no"}  # the prompt alone cut
    assert encode_preference(prompt, tok, 32)["cut"] and not encode_preference(ROWS[0], tok, 32)["cut"]


def held_out_prompts(tmp_path, stage, rows, tok):
    """The prompts of the rows load_examples trains on and holds out, as text."""
    path = write(tmp_path, "pairs.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    args = Namespace(dataset=path, stage=stage, max_length=64, eval_fraction=0.2, batch_size=1, grad_accum=1)
    return [{tok.decode(e["prompt"] if "prompt" in e else e["input_ids"][:e["labels"].count(-100)]) for e in split}
            for split in load_examples(args, tok)]


def test_rows_are_held_out_by_their_prompt_the_same_in_every_stage(tmp_path):
    """Not the file's last rows (HH's last subset, SHP's last subreddits), nor a boundary that moves with the rows
    each stage drops: a reward model is not evaluated on prompts its SFT model learnt. A prompt's pairs stay
    together; about --eval-fraction of the prompts are held out, whatever the rows' order."""
    init_distributed()  # a world of one: load_examples asks for its rank
    tok = make_tokenizer()
    rows = [{"prompt": f"review {i}:", "chosen": " great", "rejected": " great" if i % 3 else " awful"}
            for i in range(100)]  # rm drops the pairs whose replies are alike, sft keeps them
    rows += [{**row, "rejected": " bad"} for row in rows[::2]]  # a second pair for every other prompt
    sft_train, sft_held = held_out_prompts(tmp_path, "sft", rows, tok)
    rm_train, rm_held = held_out_prompts(tmp_path, "rm", rows, tok)
    assert not sft_train & sft_held and not rm_train & rm_held
    assert rm_held <= sft_held and not rm_train & sft_held and 10 <= len(sft_held) <= 30
    assert held_out_prompts(tmp_path, "rm", rows[::-1], tok) == [rm_train, rm_held]


def test_rl_prompts_keep_their_last_tokens():
    """A prompt past max_length keeps its end, where the answer begins."""
    tok = make_tokenizer()
    prompt = "the film was great and the food was awful"
    full = tok(prompt)["input_ids"]
    assert encode_rl_prompt({"prompt": prompt}, tok, 3) == {"prompt": prompt, "input_ids": full[-3:], "cut": True}
    assert encode_rl_prompt({"prompt": prompt}, tok, len(full))["cut"] is False


@pytest.mark.parametrize("chat", [False, True])
def test_prompts_cut_on_the_left_keep_their_bos_first(chat):
    """A tokenizer that starts every text with BOS (Llama 2's, Gemma's): an RL prompt or a pair's prompt past
    max_length keeps the BOS first, then its last tokens; models trained with BOS always there read text
    without it as another kind of text. SFT cuts on the right: its rows keep theirs anyway."""
    tok = make_sentencepiece_tokenizer(chat_template=chat)
    if chat:  # Gemma's and Llama 2's templates write BOS first
        tok.chat_template = "{{ bos_token }}" + tok.chat_template
    prompt = "the film was great and the food was great and the service was slow"
    full = M.encode_prompt(tok, prompt)
    assert full[0] == tok.bos_token_id and len(full) > 8
    assert encode_rl_prompt({"prompt": prompt}, tok, 8)["input_ids"] == full[:1] + full[-7:]
    pair = encode_preference({"prompt": prompt, "chosen": " yes", "rejected": " no"}, tok, 8)
    full_prompt = encode_pair(tok, prompt, " yes")[0]
    kept = 8 - max(len(pair["chosen"]), len(pair["rejected"]))
    assert pair["prompt"] == full_prompt[:1] + full_prompt[len(full_prompt) - kept + 1:] and len(pair["prompt"]) == kept


def test_a_bos_that_only_opens_a_turn_goes_with_the_cut():
    """SmolLM2's BOS is ChatML's <|im_start|>, which its template writes before each turn and its tokenizer
    before no text: kept first, it would open a turn without a role before text from the middle of another."""
    tok = make_tokenizer(chat_template=True)
    tok.bos_token = "<|im_start|>"
    prompt = "the film was great and the food was great and the service was slow"
    full = M.encode_prompt(tok, prompt)
    assert full[0] == tok.bos_token_id and tok("a")["input_ids"][0] != tok.bos_token_id
    assert encode_rl_prompt({"prompt": prompt}, tok, 8)["input_ids"] == full[-8:]


def test_pairs_whose_replies_are_alike_are_dropped_and_counted():
    """No preference to learn: alike as text, or once the replies keep only their last max_length - 1 tokens."""
    tok = make_tokenizer()
    rows = [{"prompt": "the film was", "chosen": " great", "rejected": " great"},
            {"prompt": "the film was", "chosen": " awful. the food was great" + " and the film was great" * 8,
             "rejected": " great. the food was great" + " and the film was great" * 8},
            {"prompt": "the film was", "chosen": " great", "rejected": " awful"}]
    examples, dropped = tokenize(rows, "rm", tok, 16)
    assert dropped == 2 and len(examples) == 1
    assert len(tokenize(rows[1:], "rm", tok, 512)[0]) == 2  # the long pair differs when it is whole


def test_empty_replies_are_dropped_and_counted():
    tok = make_tokenizer()
    rows = [{"prompt": "the film was", "chosen": " great", "rejected": " awful"},
            {"prompt": "the film was", "chosen": "  ", "rejected": " awful"},
            {"prompt": "the film was", "chosen": " great", "rejected": ""}]
    assert [len(x) if i == 0 else x for i, x in enumerate(tokenize(rows, "rm", tok, 64))] == [1, 2]
    sft = [{"prompt": "the film was", "response": ""}, {"prompt": "the film was", "response": " great"}]
    assert [len(x) if i == 0 else x for i, x in enumerate(tokenize(sft, "sft", tok, 64))] == [1, 1]


@pytest.mark.parametrize("stage, row, message", [
    ("rm", {"prompt": None, "chosen": "a", "rejected": "b"}, "row 2: column 'prompt' is None; expected text"),
    ("rm", {"prompt": "p", "chosen": 5, "rejected": "b"}, "row 2: column 'chosen' is 5; expected text"),
    ("sft", {"prompt": "p", "response": ["x"]}, "row 2: column 'response' is ['x']; expected text"),
    ("sft", {"messages": "hi"}, "row 2: column 'messages' is 'hi'; expected a list of {role, content} messages"),
    ("ppo", {"prompt": 3.5}, "row 2: column 'prompt' is 3.5; expected text"),
    ("sft", {"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]},
     "row 2: the last of 'messages' is a user message; expected the assistant's"),
    ("sft", {"messages": [{"role": "assistant", "content": "hello"}]},  # once learnt as plain text, untemplated
     "row 2: 'messages' holds the assistant's message alone; expected a turn before it (for plain text, a {text} row)"),
    ("sft", {"messages": [{"content": "hi"}]},
     "row 2: column 'messages' is [{'content': 'hi'}]; expected a list of {role, content} messages"),
])
def test_fields_that_are_not_text_name_row_and_column(stage, row, message):
    good = {"prompt": "the film was", "chosen": " great", "rejected": " awful", "response": " great"}
    if "messages" in row:
        good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    with pytest.raises(DataError) as e:
        tokenize([good, row], stage, make_tokenizer(chat_template="messages" in row), 64)
    assert str(e.value) == message


def test_chat_messages_without_a_chat_template_are_a_data_error():
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    with pytest.raises(DataError, match="row 1: chat messages, but .* has no chat template to write them"):
        tokenize([row], "sft", make_tokenizer(), 64)


def test_an_eos_inside_the_text_does_not_end_it():
    tok = make_tokenizer()
    ex = encode_sft({"prompt": "the film", "response": " was great<|endoftext|> and long"}, tok, 64)
    assert ex["input_ids"].count(tok.eos_token_id) == 2 and ex["input_ids"][-1] == tok.eos_token_id
    for row in ({"prompt": "the film", "response": " was great<|endoftext|>"}, {"text": "the film<|endoftext|>"}):
        ids = encode_sft(row, tok, 64)["input_ids"]
        assert ids[-1] == tok.eos_token_id and ids[-2] != tok.eos_token_id  # one that ends it: not doubled


def test_an_sft_file_may_mix_replies_and_preference_rows():
    rows = [{"prompt": "a", "response": " b", "chosen": None, "rejected": None},
            {"prompt": "a", "response": None, "chosen": " b", "rejected": " c"}]
    first, second = tokenize(rows, "sft", make_tokenizer(), 64)[0]
    assert first == second


def test_a_row_with_a_prompt_and_a_text_column_learns_the_reply():
    """Some sets carry the whole text beside prompt and response: the reply is learnt, its prompt masked."""
    tok = make_tokenizer()
    both = {"prompt": "what is the capital of France?", "response": " Paris.",
            "text": "what is the capital of France? Paris."}
    assert encode_sft(both, tok, 64) == encode_sft({"prompt": both["prompt"], "response": " Paris."}, tok, 64)
    assert -100 in encode_sft(both, tok, 64)["labels"]


def test_a_policy_template_that_opens_its_reply_is_checked_without_one():
    """DeepSeek-R1-Distill's generation prompt opens the reply (`<think>`), which the written reply does not
    repeat: the policy only ever writes the prompt (sampling), a reward model the prompt and its reply."""
    tok = make_tokenizer(chat_template=True)
    tok.chat_template = tok.chat_template.replace("assistant\n' }}", "assistant\n<think>\n' }}")
    assert "<think>" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                add_generation_prompt=True)
    data.check_prompts(tok, ["hi"], replies=False)
    with pytest.raises(DataError, match="chat template output does not extend the prompt"):
        data.check_prompts(tok, ["hi"])


def test_a_chat_template_that_refuses_the_messages_is_a_data_error_naming_the_row():
    """Gemma's and Mistral's templates raise on a system turn: one line, not jinja's traceback."""
    tok = make_tokenizer(chat_template=True)
    tok.chat_template = STRICT_TEMPLATE
    system = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"}]
    fine = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    with pytest.raises(DataError, match="row 2: .*chat template refuses these messages .System role not supported"):
        tokenize([fine, {"messages": system + [{"role": "assistant", "content": "hello"}]}], "sft", tok, 64)
    with pytest.raises(DataError, match="refuses these messages .*; the prompt: "):
        data.check_prompts(tok, ["hi", system])
    data.check_prompts(tok, ["hi", [{"role": "user", "content": "hi"}]])
    tok.chat_template = "{{ 1 / 0 }}"  # a template that fails with a Python error, not a TemplateError
    with pytest.raises(DataError, match=r"chat template refuses these messages \(ZeroDivisionError: division by zero"):
        data.check_prompts(tok, ["hi"])


def test_a_null_field_is_named_by_its_own_column():
    tok = make_tokenizer()
    with pytest.raises(DataError, match="row 1: column 'response' is None; expected text"):
        tokenize([{"prompt": "a", "response": None}], "sft", tok, 64)
    with pytest.raises(DataError, match="row 1: column 'messages' is None"):
        tokenize([{"messages": None}], "sft", tok, 64)


def test_preference_pairs_share_prompt_and_keep_the_end():
    tok = make_tokenizer()
    ex = encode_preference({"prompt": "the film was great " * 5, "chosen": " yes", "rejected": " no"}, tok, 8)
    assert ex["chosen"][-1] == ex["rejected"][-1] == tok.eos_token_id  # the ends are kept
    assert len(ex["prompt"]) + max(len(ex["chosen"]), len(ex["rejected"])) == 8
    row = {"prompt": "hi", "chosen": " the film was great" * 9, "rejected": " no"}
    long = encode_preference(row, tok, 8)
    assert len(long["prompt"]) == 1 and len(long["chosen"]) == 7  # the prompt keeps a token: ZeRO-3 parity
    whole = encode_preference(row, tok, 64)["chosen"]
    assert long["chosen"] == whole[-7:] and tokenize([row], "rm", tok, 8)[0][0] == long
    assert tokenize([row], "dpo", tok, 8)[0][0] == {**long, "chosen": whole[:7]}  # DPO: the reply's start
    empty = encode_preference({"prompt": "", "chosen": " yes", "rejected": " no"}, tok, 8)
    assert empty["prompt"] == [tok.bos_token_id]
    full = encode_preference(ROWS[0], tok, 64)
    assert full["prompt"] == tok(ROWS[0]["prompt"])["input_ids"]
    assert full["chosen"] == tok(ROWS[0]["chosen"])["input_ids"] + [tok.eos_token_id]
    short = encode_preference(ROWS[1], tok, 64)
    batch = collate_pairs([full, short], tok.pad_token_id, slack=math.inf)[0]  # one group: both pairs padded
    prompts, replies, mask = batch["prompt_ids"], batch["reply_ids"], batch["attention_mask"]  # (2, P), (4, R), (4, P+R)
    first, second = sorted([full, short], key=lambda ex: len(ex["prompt"]))  # groups run in prompt-length order
    assert prompts[0, prompts.shape[1] - len(first["prompt"]):].tolist() == first["prompt"]  # left-padded
    assert replies[3, : len(second["rejected"])].tolist() == second["rejected"] and replies[0, 0] == first["chosen"][0]
    lengths = [len(ex["prompt"]) + len(ex[k]) for ex in (first, second) for k in ("chosen", "rejected")]
    assert mask.sum(1).tolist() == lengths and mask[:2, : prompts.shape[1] - len(first["prompt"])].sum() == 0


def test_a_reply_marked_cut_off_keeps_no_eos():
    tok = make_tokenizer()
    row = {**ROWS[0], "rejected_ended": False, "chosen_ended": None}  # null: ended, as when absent
    ex = encode_preference(row, tok, 64)
    assert ex["chosen"] == tok(ROWS[0]["chosen"])["input_ids"] + [tok.eos_token_id]
    assert ex["rejected"] == tok(ROWS[0]["rejected"], add_special_tokens=False)["input_ids"]
    with pytest.raises(DataError, match="row 2: column 'chosen_ended' is 'no'; expected true or false"):
        tokenize([ROWS[0], {**ROWS[0], "chosen_ended": "no"}], "rm", tok, 64)


@pytest.mark.parametrize("prompt", ["is it good?", ""])
def test_sft_learns_no_eos_after_a_reply_marked_cut_off(prompt):
    tok = make_tokenizer()
    ends = [encode_sft(row, tok, 64)["input_ids"][-1] == tok.eos_token_id for row in (
        {"prompt": prompt, "response": " yes it"}, {"prompt": prompt, "response": " yes it", "response_ended": False},
        {**ROWS[0], "prompt": prompt, "chosen_ended": False}, {**ROWS[0], "prompt": prompt, "rejected_ended": False})]
    assert ends == [True, False, False, True]


def test_pairs_are_grouped_only_when_padding_costs_little():
    ex = lambda p, c, r: {"prompt": [5] * p, "chosen": [6] * c, "rejected": [7] * r}
    alike = [ex(250, 3, 2), ex(250, 2, 3), ex(248, 3, 3)]  # 1 of 771 tokens would be padding
    unlike = [ex(20, 200, 30), ex(200, 40, 50)]  # padded to 200 + 2 x 200 each
    assert [len(g["prompt_ids"]) for g in collate_pairs(alike + unlike, 0)] == [1, 1, 3]
    assert [len(g["prompt_ids"]) for g in collate_pairs(alike, 0, slack=None)] == [1, 1, 1]


def test_prompts_are_left_padded():
    tok = make_tokenizer()
    examples, _ = tokenize([{"prompt": "hi"}, {"prompt": "the film was great, was it not?"}], "ppo", tok, 64)
    batch = collate_prompts(examples, tok.pad_token_id)
    short = len(examples[0]["input_ids"])
    assert batch["input_ids"][0, -short:].tolist() == examples[0]["input_ids"]
    assert batch["attention_mask"][0].tolist() == [0] * (batch["input_ids"].shape[1] - short) + [1] * short
    assert batch["prompts"] == ["hi", "the film was great, was it not?"]
    assert batch["attention_mask"][1].all()
