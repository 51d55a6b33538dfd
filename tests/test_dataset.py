"""Loaders for every benchmark format, on small fixture files written here."""

from __future__ import annotations

import json

import pytest

from icelora.data_utils.dataset import (
    DatasetError,
    all_aliases,
    first_alias,
    load_dataset,
    parse_indices,
    resolve_dataset,
)

KNOWEDIT_ZSRE = [{
    "subject": "Epaspidoceras", "target_new": "Noctuidae", "prompt": "Which family does Epaspidoceras belong to?",
    "ground_truth": ["Aspidoceratidae"], "rephrase_prompt": "What family are Epaspidoceras?",
    "locality": {"Relation_Specificity": [{"prompt": "The taxon rank of Epaspidoceras is", "ground_truth": ["genus"]},
                                          {"prompt": "Epaspidoceras parent taxon", "ground_truth": ["Aspido"]}]},
    "portability": {"Reasoning": [{"prompt": "What is the common name for the family?",
                                   "ground_truth": "Owlet moths"}],
                    "Subject_Aliasing": [{"prompt": "Which family does E. belong to?", "ground_truth": "Noctuidae"}]},
}]
RECENT = [{
    "subject": "Leo Arons", "prompt": "The place of death of Leo Arons is", "target_new": "Berlin",
    "portability": {"Logical_Generalization": [{"prompt": "Is Leo Arons still alive?", "ground_truth": [["no"]]}]},
    "locality": {"Relation_Specificity": [{"prompt": "The father of Leo Arons is",
                                           "ground_truth": [["Albert Arons", "A. Arons"]]}],
                 "Forgetfulness": [{"prompt": ["Leo Arons died in", "Leo Arons passed away in"],
                                    "ground_truth": [["Berlin"]]}]},
}]
MEND = [{"subject": "IAAF Combined Events Challenge",
         "src": "When was the inception of IAAF Combined Events Challenge?",
         "pred": "2011", "rephrase": "When was the IAAF Combined Events Challenge launched?", "alt": "2006",
         "answers": ["1998"], "loc": "nq question: what is the name of the last episode of spongebob",
         "loc_ans": "The String", "portability": {"Recalled Relation": "x", "New Question": "Which sport?",
                                                 "New Answer": "Athletics"}}]


def write(tmp_path, name, records):
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return path


def test_knowedit_zsre(tmp_path):
    data = load_dataset(write(tmp_path, "anything.json", KNOWEDIT_ZSRE))
    assert data.format == "knowedit"
    record = data.records[0]
    assert record.request.target == "Noctuidae" and record.request.subject == "Epaspidoceras"
    assert record.ground_truth == "Aspidoceratidae" and record.rephrase == ("What family are Epaspidoceras?",)
    assert [(i.kind, i.answer) for i in record.portability] == [("Reasoning", "Owlet moths"),
                                                                 ("Subject_Aliasing", "Noctuidae")]
    assert [i.answer for i in record.locality] == ["genus", "Aspido"]


def test_ice_format_is_recognised_by_its_contexts(tmp_path):
    records = [{**KNOWEDIT_ZSRE[0], "context": ["Epaspidoceras is a Noctuidae.", "It is in Noctuidae."]}]
    data = load_dataset(write(tmp_path, "data.json", records))
    assert data.format == "ice"
    assert data.records[0].request.contexts == ("Epaspidoceras is a Noctuidae.", "It is in Noctuidae.")


def test_wikidata_recent_alias_lists_and_prompt_lists(tmp_path):
    record = load_dataset(write(tmp_path, "r.json", RECENT)).records[0]
    assert record.rephrase == () and record.ground_truth is None
    assert [(i.kind, i.prompt, i.answer) for i in record.locality] == [
        ("Relation_Specificity", "The father of Leo Arons is", "Albert Arons"),
        ("Forgetfulness", "Leo Arons died in", "Berlin"),
        ("Forgetfulness", "Leo Arons passed away in", "Berlin"),
    ]
    assert record.portability[0].answer == "no"


def test_mend_format(tmp_path):
    data = load_dataset(write(tmp_path, "m.json", MEND))
    record = data.records[0]
    assert data.format == "mend"
    assert (record.request.prompt, record.request.target) == (MEND[0]["src"], "2006")
    assert record.rephrase == (MEND[0]["rephrase"],) and record.ground_truth == "1998"
    assert record.ground_truth_aliases == ("1998",)
    assert [(i.kind, i.answer) for i in record.locality] == [("NQ", "The String")]
    assert [(i.kind, i.answer) for i in record.portability] == [("One_Hop", "Athletics")]


def test_first_alias_rule():
    assert first_alias("Rome") == "Rome"
    assert first_alias(["Rome", "Roma"]) == "Rome"
    assert first_alias([["Rome", "Roma"], ["Paris"]]) == "Rome"
    assert first_alias([]) is None and first_alias([[""]]) is None


def test_every_alias_of_the_old_answer_is_kept(tmp_path):
    assert all_aliases([["Rome", " Roma "], ["Paris", ""]]) == ("Rome", "Roma", "Paris")
    assert all_aliases(None) == () and all_aliases("Rome") == ("Rome",)
    raw = {**KNOWEDIT_ZSRE[0], "ground_truth": ["Lionel Penrose", "Roger Penrose"]}
    record = load_dataset(write(tmp_path, "z.json", [raw])).records[0]
    assert record.ground_truth == "Lionel Penrose"
    assert record.ground_truth_aliases == ("Lionel Penrose", "Roger Penrose")


def test_bad_input_names_file_record_and_field(tmp_path):
    not_json = tmp_path / "bad.json"
    not_json.write_text("{not json")
    with pytest.raises(DatasetError, match=r"bad\.json is not a JSON file"):
        load_dataset(not_json)
    records = [KNOWEDIT_ZSRE[0], {"prompt": "x"}, {**KNOWEDIT_ZSRE[0], "target_new": " "}]
    path = write(tmp_path, "d.json", records)
    with pytest.raises(DatasetError, match=r"d\.json record 1: field 'target_new' is missing"):
        load_dataset(path)
    with pytest.raises(DatasetError, match=r"record 2: field 'target_new' is empty"):
        load_dataset(path, indices="2:3")
    no_answer = [{**KNOWEDIT_ZSRE[0], "portability": {"Reasoning": [{"prompt": "Why?"}]}}]
    with pytest.raises(DatasetError, match=r"record 0\.portability\.Reasoning\[0\]: field 'ground_truth'"):
        load_dataset(write(tmp_path, "p.json", no_answer))
    data = load_dataset(path, skip_invalid=True)
    assert data.indices == [0] and [s["index"] for s in data.skipped] == [1, 2]


def test_index_selection():
    assert parse_indices("0:3", 10) == [0, 1, 2]
    assert parse_indices("5:", 7) == [5, 6]
    assert parse_indices("3,1", 10) == [3, 1]
    assert parse_indices(None, 5, limit=2) == [0, 1]
    with pytest.raises(DatasetError, match="outside"):
        parse_indices("0:200", 10, where="f.json")
    with pytest.raises(DatasetError, match="--limit"):
        parse_indices(None, 5, limit=0)


def test_short_names_resolve_against_the_data_folder(tmp_path):
    (tmp_path / "ZsRE").mkdir()
    write(tmp_path / "ZsRE", "ZsRE-test-all.json", KNOWEDIT_ZSRE)
    assert resolve_dataset("zsre", tmp_path) == tmp_path / "ZsRE" / "ZsRE-test-all.json"
    with pytest.raises(DatasetError, match=r"put the KnowEdit/ICE files under .* as ICE_format/zsre\.json"):
        resolve_dataset("zsre-ice", tmp_path)
    with pytest.raises(DatasetError, match="unknown data set 'counterfact'"):
        resolve_dataset("counterfact", tmp_path)
