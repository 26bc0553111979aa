"""One base in memory, an adapter per user: served per request, versioned on disk, trained by DPO, forgotten."""

import threading
import weakref

import pytest
import torch

from conftest import build_tiny_causal, build_tiny_seq2seq, word_tokenizer
from rlhfkit.data.records import PreferencePair
from rlhfkit.feedback import db as feedback_db
from rlhfkit.feedback import service
from rlhfkit.models.update import TrainingDiverged
from rlhfkit.personal import store
from rlhfkit.personal import train as personal_train
from rlhfkit.personal.models import POPULATION, Forgotten, PersonalModels, user_owner
from rlhfkit.personal.train import PersonalDPOConfig, train_version

PAIRS = [PreferencePair(prompt="how do i fix bike", chosen="thanks you can fix it", rejected="you idiot go away"),
         PreferencePair(prompt="how do i bake cake", chosen="glad to help bake", rejected="shut up dumb")]
FAST = PersonalDPOConfig(epochs=2, batch_size=2, lr=1e-2)


@pytest.fixture
def models(tmp_path):
    return PersonalModels(build_tiny_causal(), word_tokenizer(), tmp_path / "adapters")


def lora_weights(models, adapter):
    return {n: p.detach().clone() for n, p in models.model.named_parameters() if f".{adapter}." in n}


def users_who_chose(tmp_path, *names):
    """A feedback database where each named user chose the first answer of every pair of PAIRS: (sessions, ids)."""
    sessions = feedback_db.session_factory(str(tmp_path / "feedback.db"))
    with sessions() as db:
        users = [service.create_user(db, name, password=f"{name}-password") for name in names]
        for user in users:
            for pair in PAIRS:
                row = store.record_question(db, user, pair.prompt, (pair.chosen, pair.rejected), ("base", "base"))
                store.record_choice(db, user, row.id, "a")
        return sessions, [user.id for user in users]


def first_training_held(monkeypatch):
    """(started, release): the first training to reach its DPO steps waits there until ``release`` is set."""
    started, release, optimise = threading.Event(), threading.Event(), personal_train._optimise

    def held_once(*args):
        if not started.is_set():
            started.set()
            release.wait(30)
        return optimise(*args)

    monkeypatch.setattr(personal_train, "_optimise", held_once)
    return started, release


def training_started(sessions, train, models, *args):
    """(the thread running ``train(models, db, *args)`` on a session of its own, started; its result, once
    it ends, in a list)."""
    result = []

    def run():
        with sessions() as db:
            result.append(train(models, db, *args))

    training = threading.Thread(target=run)
    training.start()
    return training, result


def delete_everything_of(sessions, models, user_id):
    """What the API's deletion does: the user's choices, then their adapters and those trained on them."""
    with sessions() as db:
        store.delete_user_data(db, db.get(service.User, user_id))
    return models.forget(user_id)


def test_a_trained_version_is_saved_whole_and_served_to_its_user_only(models):
    ann = user_owner(1)
    assert models.adapter(ann) is None  # no version yet: the base model answers
    version, history = train_version(models, ann, PAIRS, FAST)
    assert version == 1 and len(history) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    folder = models.folder / ann / "v1"
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                        "version.json"]
    assert models.version_info(ann, 1)["pairs"] == 2 and models.version_info(ann, 1)["start"] == "base"
    assert models.adapter(ann) == "user-1-v1" and models.adapter(user_owner(2)) is None
    prompt = models.tokenizer(["how do i fix bike"], return_tensors="pt")["input_ids"]
    with models.active("user-1-v1"):
        personal = models.model(prompt).logits
    with models.active(None):
        base = models.model(prompt).logits
    assert not torch.allclose(personal, base)  # the adapter changed the model; its B left zero


def test_versions_reload_from_disk_in_a_new_process_and_the_previous_is_dropped_from_memory(models, tmp_path):
    ann = user_owner(1)
    train_version(models, ann, PAIRS, FAST)
    train_version(models, ann, PAIRS, FAST)
    assert models.adapter(ann) == "user-1-v2" and "user-1-v1" not in models.adapter_names()
    trained = lora_weights(models, "user-1-v2")
    again = PersonalModels(build_tiny_causal(), word_tokenizer(), models.folder)
    assert again.adapter(ann) == "user-1-v2"
    reloaded = lora_weights(again, "user-1-v2")
    assert trained.keys() == reloaded.keys() and all(torch.equal(trained[k], reloaded[k]) for k in trained)


def test_a_new_users_adapter_starts_from_the_population_adapter_which_is_its_reference(models):
    train_version(models, POPULATION, PAIRS, FAST)
    start = lora_weights(models, "population-v1")
    name = models.new_adapter(models.next_adapter(user_owner(3)), models.starting_point(user_owner(3)))
    copied = lora_weights(models, name)
    assert len(copied) == len(start)
    assert all(torch.equal(copied[k], start[k.replace(name, "population-v1")]) for k in copied)
    models.delete_adapter(name)
    train_version(models, user_owner(3), PAIRS[:1], FAST)
    assert models.version_info(user_owner(3), 1)["start"] == "population-v1"
    train_version(models, POPULATION, PAIRS, FAST)  # the population's own versions start from the base
    assert models.version_info(POPULATION, 2)["start"] == "base"


def test_a_training_that_diverges_names_its_step_and_leaves_the_previous_version_in_use(models, monkeypatch):
    ann = user_owner(1)
    train_version(models, ann, PAIRS, FAST)
    served = lora_weights(models, "user-1-v1")
    monkeypatch.setattr(personal_train, "personal_loss", lambda policy, *a: (policy.sum() * float("nan"),
                                                                              policy[:1]))
    with pytest.raises(TrainingDiverged, match=r"stopped at step 1: .*not finite"):
        train_version(models, ann, PAIRS, FAST)
    assert models.versions(ann) == [1] and models.adapter(ann) == "user-1-v1"
    assert "user-1-v2" not in models.adapter_names()
    assert not any((models.folder / ann).glob(".v*"))  # no partial folder left
    assert all(torch.equal(w, lora_weights(models, "user-1-v1")[k]) for k, w in served.items())


def test_forgetting_a_user_removes_their_files_and_adapters_from_memory_only(models):
    train_version(models, user_owner(1), PAIRS, FAST)
    train_version(models, user_owner(2), PAIRS, FAST)
    models.forget(1)
    assert not (models.folder / "user-1").exists() and models.adapter(user_owner(1)) is None
    assert not [n for n in models.adapter_names() if n.startswith("user-1-")]
    assert models.adapter(user_owner(2)) == "user-2-v1"


def test_an_adapter_holds_r_times_in_plus_out_weights_per_layer(models):
    """Tiny GPT-2 (32 wide, 2 layers), r = 8: c_attn 32→96, c_proj 32→32, c_fc 32→128, mlp c_proj 128→32,
    and lm_head 32→vocab (all-linear leaves the output layer out)."""
    name = models.new_adapter("user-9-v1", None)
    per_layer = 8 * ((32 + 96) + (32 + 32) + (32 + 128) + (128 + 32))
    assert models.adapter_megabytes(name) == pytest.approx(2 * per_layer * 4 / 2**20)
    print(f"tiny GPT-2 adapter, r=8: {models.adapter_megabytes(name):.4f} MiB")


def test_answers_come_from_the_requested_adapter(models):
    train_version(models, user_owner(1), PAIRS, PersonalDPOConfig(epochs=4, batch_size=2, lr=5e-2))
    personal = models.answer("how do i fix bike", "user-1-v1", seed=0)
    base = models.answer("how do i fix bike", None, seed=0)
    assert isinstance(personal.text, str) and isinstance(base.text, str) and personal.text != base.text
    assert models.answer("how do i fix bike", None, seed=0) == base  # the same draws: only the weights differ


def test_deleting_a_user_during_their_training_waits_for_it_and_leaves_nothing(models, tmp_path, monkeypatch):
    sessions, [ann_id] = users_who_chose(tmp_path, "ann")
    started, release = first_training_held(monkeypatch)
    training, _ = training_started(sessions, personal_train.train_user, models, ann_id, FAST)
    assert started.wait(30)
    deleting = threading.Thread(target=delete_everything_of, args=(sessions, models, ann_id))
    deleting.start()
    deleting.join(0.5)
    assert deleting.is_alive()  # waiting for the training of ann to end
    release.set()
    training.join(30), deleting.join(30)
    owner = user_owner(ann_id)
    assert not (models.folder / owner).exists() and models.adapter(owner) is None
    assert not [n for n in models.adapter_names() if n.startswith(f"{owner}-")]
    with sessions() as db:
        assert store.user_choices(db, ann_id) == []
        assert personal_train.train_user(models, db, ann_id, FAST) is None  # a training queued later: nothing


def test_past_max_in_memory_the_least_recently_used_adapter_is_dropped_and_reloads_the_same(tmp_path):
    models = PersonalModels(build_tiny_causal(), word_tokenizer(), tmp_path / "adapters", max_in_memory=1)
    train_version(models, user_owner(1), PAIRS, FAST)
    trained = lora_weights(models, "user-1-v1")
    train_version(models, user_owner(2), PAIRS, FAST)
    assert [n for n in models.adapter_names() if n.startswith("user-")] == ["user-2-v1"]
    assert models.adapter(user_owner(1)) == "user-1-v1"
    assert [n for n in models.adapter_names() if n.startswith("user-")] == ["user-1-v1"]
    assert all(torch.equal(w, lora_weights(models, "user-1-v1")[k]) for k, w in trained.items())


def test_a_version_half_written_by_a_killed_process_is_not_a_version_and_is_replaced(models):
    ann = user_owner(1)
    train_version(models, ann, PAIRS, FAST)
    leftover = models.folder / ann / ".v2.partial"
    leftover.mkdir()
    (leftover / "adapter_model.safetensors").write_bytes(b"cut short")
    again = PersonalModels(build_tiny_causal(), word_tokenizer(), models.folder)  # the restarted server
    assert again.versions(ann) == [1] and again.adapter(ann) == "user-1-v1"
    assert train_version(again, ann, PAIRS, FAST)[0] == 2
    assert not leftover.exists() and again.version_info(ann, 2)["pairs"] == 2


def eos_logit_shifted(models, shift: float):
    """The model's EOS logit moved by ``shift`` at every step (+100: it always ends, −100: it never does)."""
    eos = models.tokenizer.eos_token_id

    def hook(_module, _inputs, logits):
        logits[..., eos] += shift
        return logits

    return models.model.get_output_embeddings().register_forward_hook(hook)


def test_an_answer_says_whether_it_was_cut_at_max_new_tokens(models):
    with eos_logit_shifted(models, -100.0):
        cut = models.answer("how do i fix bike", None, max_new_tokens=5, seed=0)
    with eos_logit_shifted(models, 100.0):
        ended = models.answer("how do i fix bike", None, max_new_tokens=5, seed=0)
    assert cut.truncated and len(cut.text.split()) == 5
    assert not ended.truncated and ended.text == ""


def test_a_choice_of_a_cut_answer_gives_a_pair_marked_cut_and_a_batch_without_its_eos(models, tmp_path):
    from rlhfkit.personal.train import pair_batch

    sessions = feedback_db.session_factory(str(tmp_path / "feedback.db"))
    with sessions() as db:
        ann = service.create_user(db, "ann", password="ann-password")
        asked = store.record_question(db, ann, "how do i fix bike", ("thanks you can fix", "you idiot go away"),
                                      ("base", "base τ=0.7"), truncated=(True, False))
        store.record_choice(db, ann, asked.id, "a")
        [pair] = store.preference_pairs(store.user_choices(db, ann.id))
    assert (pair.chosen, pair.chosen_truncated, pair.rejected_truncated) == ("thanks you can fix", True, False)
    batch = pair_batch(models, [pair], PersonalDPOConfig())
    eos = models.tokenizer.eos_token_id
    assert batch.completion_mask.sum(dim=1).tolist() == [4, 5]  # 4 words, cut; 4 words + the EOS it ended with
    assert eos not in batch.completion_ids[0].tolist() and batch.completion_ids[1, 4].item() == eos


def test_forgetting_a_user_removes_every_adapter_trained_on_their_pairs_and_keeps_the_others(models):
    """Population v1 learned from users 1 and 2, v2 from 2 and 3; user 2 started from v1, user 3 from v2.
    User 1's deletion removes population v1 and user 2's version (its weights began as v1's), from disk
    and memory; numbers are not given again, and each owner's folder says why."""
    train_version(models, user_owner(1), PAIRS, FAST)
    train_version(models, POPULATION, PAIRS, FAST, users=[1, 2])
    train_version(models, user_owner(2), PAIRS, FAST)
    train_version(models, POPULATION, PAIRS, FAST, users=[2, 3])
    train_version(models, user_owner(3), PAIRS, FAST)
    models.adapter(user_owner(2))  # user 2's version in memory too
    assert {"population-v2", "user-2-v1"} <= set(models.adapter_names())

    assert models.forget(1) == Forgotten(population=[1], started_from_them={2: [1]})
    assert models.versions(POPULATION) == [2] and models.versions(user_owner(2)) == []
    assert models.versions(user_owner(3)) == [1] and models.version_info(user_owner(3), 1)["start"] == "population-v2"
    assert not {"population-v1", "user-2-v1"} & set(models.adapter_names())
    assert not (models.folder / "user-1").exists() and not (models.folder / ".locks" / "user-1.lock").exists()
    assert models.removed_versions(user_owner(2)) == [
        {"version": 1, "removed": "started from population-v1, trained on the pairs of a user who deleted their data"}]
    assert sorted(p.name for p in (models.folder / "user-2").iterdir()) == ["v1.removed"]  # no weights
    assert models.next_adapter(POPULATION) == "population-v3" and models.next_adapter(user_owner(2)) == "user-2-v2"
    assert models.adapter(user_owner(2)) is None  # answers start from the population's v2 until retrained

    train_version(models, POPULATION, PAIRS, FAST)  # whose pairs not recorded: it may hold anyone's
    assert models.forget(9).population == [3] and models.versions(POPULATION) == [2]


def test_a_training_whose_starting_point_a_deletion_removes_is_trained_again_from_the_new_one(models, tmp_path,
                                                                                            monkeypatch):
    sessions, [ann_id, bob_id] = users_who_chose(tmp_path, "ann", "bob")
    with sessions() as db:
        assert personal_train.train_population(models, db, FAST) == 1
    assert models.version_info(POPULATION, 1)["users"] == [ann_id, bob_id]
    started, release = first_training_held(monkeypatch)
    training, versions = training_started(sessions, personal_train.train_user, models, bob_id, FAST)
    assert started.wait(30)  # bob's version is training from population-v1
    assert delete_everything_of(sessions, models, ann_id).population == [1]  # bob's version: not published yet
    release.set()
    training.join(30)
    assert versions == [1]  # the first try, from the removed population-v1, was refused at publish
    assert models.version_info(user_owner(bob_id), 1)["start"] == "base"
    assert models.versions(user_owner(bob_id)) == [1] and not (models.folder / POPULATION / "v1").exists()
    assert not [n for n in models.adapter_names() if n.startswith("population-")]


@pytest.mark.parametrize("users", ['{"users": ["1"]}', '{"users": 1}', '{"users": null}', '{"users": "1, 2"}',
                                   "[1, 2]", "{not json", None])
def test_a_population_version_whose_users_are_hand_edited_or_unreadable_is_removed_at_any_deletion(models, users):
    """Without a readable list of user ids, a population version may hold anyone's pairs: a deletion removes it,
    and the user versions that started from it (their own start unreadable too), never a traceback."""
    train_version(models, POPULATION, PAIRS, FAST, users=[1, 2])
    train_version(models, user_owner(2), PAIRS, FAST)
    train_version(models, user_owner(3), PAIRS, FAST)
    recorded = models.folder / POPULATION / "v1" / "version.json"
    recorded.unlink() if users is None else recorded.write_text(users)
    (models.folder / "user-3" / "v1" / "version.json").write_text('{"start": 7}')
    assert models.forget(1) == Forgotten(population=[1], started_from_them={2: [1], 3: [1]})
    assert models.versions(POPULATION) == [] and models.adapter(user_owner(2)) is None


def test_a_process_holding_a_version_in_memory_serves_the_new_one_when_its_number_is_given_again(models):
    """Another process (B) loaded user 1's v1 and population v1. User 1's deletion (A) removes their folder, so
    their next version is v1 again; a hand-deleted ``v1.removed`` gives the population's number again too.
    B must not keep answering from the removed weights under the same names."""
    other = PersonalModels(build_tiny_causal(), word_tokenizer(), models.folder)
    train_version(models, POPULATION, PAIRS, FAST, users=[1])
    train_version(models, user_owner(1), PAIRS, FAST)
    assert other.adapter(user_owner(1)) == "user-1-v1" and other.adapter(POPULATION) == "population-v1"
    models.forget(1)
    (models.folder / POPULATION / "v1.removed").unlink()
    train_version(models, POPULATION, PAIRS[:1], PersonalDPOConfig(epochs=1, batch_size=1, lr=1e-3))
    train_version(models, user_owner(1), PAIRS[:1], PersonalDPOConfig(epochs=1, batch_size=1, lr=1e-3))
    for name in ("population-v1", "user-1-v1"):
        owner = name.rsplit("-v", 1)[0]
        assert other.adapter(owner) == name
        served, new = lora_weights(other, name), lora_weights(models, name)
        assert all(torch.equal(w, new[k]) for k, w in served.items()), name


def test_a_population_training_in_another_process_that_read_my_pairs_is_waited_for_and_removed(models, tmp_path,
                                                                                             monkeypatch):
    """`personal train --population` (another process: its own lock objects on the same folder) read ann's
    pairs before her deletion here: the deletion waits for its version, removes it, and asks for a retraining."""
    trainer = PersonalModels(build_tiny_causal(), word_tokenizer(), models.folder)
    sessions, [ann_id, bob_id] = users_who_chose(tmp_path, "ann", "bob")
    started, release = first_training_held(monkeypatch)
    training, published = training_started(sessions, personal_train.train_population, trainer, FAST)
    assert started.wait(30)  # ann's pairs are read
    forgotten = []
    deleting = threading.Thread(target=lambda: forgotten.append(delete_everything_of(sessions, models, ann_id)))
    deleting.start()
    deleting.join(0.5)
    assert deleting.is_alive()  # waiting for the population training of the other process
    release.set()
    training.join(30), deleting.join(30)
    assert published == [1] and forgotten == [Forgotten(population=[1], started_from_them={})]
    assert models.versions(POPULATION) == [] and trainer.adapter(POPULATION) is None
    with sessions() as db:
        assert personal_train.train_population(trainer, db, FAST) == 2
    assert models.version_info(POPULATION, 2)["users"] == [bob_id]


def test_hand_edited_version_files_and_notes_are_shown_as_unreadable_not_a_traceback(models):
    ann = user_owner(1)
    train_version(models, ann, PAIRS, FAST)
    train_version(models, ann, PAIRS, FAST)
    (models.folder / ann / "v2" / "version.json").write_text('["pairs", 2]')
    (models.folder / ann / "v3.removed").write_text("{cut")
    (models.folder / ann / "vx.removed").write_text("{}")  # not a version's note
    assert models.version_infos(ann)[0]["pairs"] == 2
    assert models.version_infos(ann)[1] == {"version": 2, "unreadable": f"{models.folder / ann / 'v2' / 'version.json'}"
                                                                        ": not a JSON object"}
    assert models.trained_pairs(ann) == 0  # the latest version's count unknown: the next choices count from 0
    assert models.removed_versions(ann) == [{"version": 3, "removed": "unknown (its note v3.removed is not readable)"}]


def test_a_lock_file_left_by_a_killed_process_or_a_removed_locks_folder_does_not_stop_the_next_training(models):
    import shutil
    import signal
    import subprocess
    import sys

    lock = models.folder / ".locks" / "user-1.lock"
    holder = subprocess.Popen([sys.executable, "-c", f"from filelock import FileLock; import time; "
                               f"FileLock({str(lock)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    holder.send_signal(signal.SIGKILL)
    holder.wait(10)
    assert lock.exists()  # left behind; the kernel released its lock with the process
    trained = []
    training = threading.Thread(target=lambda: trained.append(train_version(models, user_owner(1), PAIRS, FAST)[0]))
    training.start()
    training.join(30)
    assert trained == [1]
    shutil.rmtree(models.folder / ".locks")  # removed by hand while serving
    assert train_version(models, POPULATION, PAIRS, FAST)[0] == 1 and (models.folder / ".locks").is_dir()


def test_a_training_whose_start_was_removed_and_its_number_given_again_by_hand_is_trained_again(models, tmp_path,
                                                                                              monkeypatch):
    """Bob trains from population-v1; ann's deletion removes v1 and someone deletes ``v1.removed``, so the next
    population version is v1 again: bob's version began as the removed weights and is refused at publish."""
    from rlhfkit.personal.models import StartRemoved

    sessions, [ann_id, bob_id] = users_who_chose(tmp_path, "ann", "bob")
    train_version(models, POPULATION, PAIRS, FAST, users=[ann_id])
    started, release = first_training_held(monkeypatch)
    refused, publish = [], models.publish

    def publish_recorded(*args, **kwargs):
        try:
            return publish(*args, **kwargs)
        except StartRemoved:
            refused.append(args[1])
            raise

    monkeypatch.setattr(models, "publish", publish_recorded)
    training, _ = training_started(sessions, personal_train.train_user, models, bob_id, FAST)
    assert started.wait(30)
    models.forget(ann_id)
    (models.folder / POPULATION / "v1.removed").unlink()
    assert train_version(models, POPULATION, PAIRS[1:], FAST, users=[bob_id])[0] == 1
    release.set()
    training.join(30)
    assert refused == [f"user-{bob_id}-v1"] and models.version_info(user_owner(bob_id), 1)["start"] == "population-v1"


def test_an_adapters_folder_where_lock_files_cannot_be_made_is_refused_before_serving(tmp_path):
    """Otherwise the first deletion would remove the user's choices, then fail on the lock and keep their
    adapters (and every training would fail). A read-only folder fails the same way (not testable as root)."""
    (tmp_path / "adapters").mkdir()
    (tmp_path / "adapters" / ".locks").write_text("")  # a careless `touch`
    with pytest.raises(OSError, match=r"adapters/\.locks: cannot make lock files there \(.*\): the adapters folder "
                                      r"must be writable"):
        PersonalModels(build_tiny_causal(), word_tokenizer(), tmp_path / "adapters")


def kl_to(models, adapter, start):
    """The mean per-token forward KL from ``start`` (None: the base) to ``adapter`` on PAIRS' answers."""
    batch = personal_train.pair_batch(models, PAIRS, FAST)
    with torch.no_grad():
        with models.active(start):
            reference, _ = personal_train.completion_log_distributions(models, batch)
        with models.active(adapter):
            policy, batch = personal_train.completion_log_distributions(models, batch)
    return personal_train.forward_kl(reference, policy, batch.completion_mask).item()


def test_the_kl_term_keeps_a_version_near_its_start_and_its_frozen_copy_is_dropped_after(models, monkeypatch):
    """The same training with γ = 0 and γ = 200: the adapter moves half as far from the base (0.0074 against
    0.0151 nats a token; γ = 20: 0.0115). From a population
    start, the KL's π_s is a copy made when training begins: a new population version that drops the old
    one from memory mid-training changes nothing, and the copy is gone afterwards, failed or not."""
    strong = PersonalDPOConfig(epochs=6, batch_size=2, lr=5e-2)
    train_version(models, user_owner(1), PAIRS, strong)
    train_version(models, user_owner(2), PAIRS, PersonalDPOConfig(**{**strong.__dict__, "kl_coef": 200.0}))
    free, held = kl_to(models, "user-1-v1", None), kl_to(models, "user-2-v1", None)
    assert held < 0.6 * free, (held, free)

    train_version(models, POPULATION, PAIRS, FAST)
    apply_gradients, calls = personal_train.apply_gradients, []

    def new_population_meanwhile(*args):
        calls.append(1)
        if len(calls) == 1:  # population-v2 published mid-training: v1 leaves memory
            train_version(models, POPULATION, PAIRS, FAST)
            assert "population-v1" not in models.adapter_names()
        return apply_gradients(*args)

    monkeypatch.setattr(personal_train, "apply_gradients", new_population_meanwhile)
    version, history = train_version(models, user_owner(3), PAIRS, PersonalDPOConfig(**{**FAST.__dict__,
                                                                                        "kl_coef": 1.0}))
    assert version == 1 and history[0]["kl"] == 0.0 and all(step["kl"] >= 0 for step in history)
    assert [n for n in models.adapter_names() if n.endswith("-start")] == []
    monkeypatch.setattr(personal_train, "apply_gradients", lambda *a: (_ for _ in ()).throw(OSError("disk")))
    with pytest.raises(OSError):
        train_version(models, user_owner(3), PAIRS, PersonalDPOConfig(**{**FAST.__dict__, "kl_coef": 1.0}))
    assert [n for n in models.adapter_names() if n.endswith("-start") or n == "user-3-v2"] == []


@pytest.mark.parametrize("kl_coef", [0.0, 1.0])
def test_no_step_keeps_its_next_token_distributions_alive_into_the_next(models, monkeypatch, kl_coef):
    """The [B, T, V] log-distributions (B·T·V·4 bytes each: 1.2 GB for 16 answers of 128 tokens over a 150k
    vocabulary) are freed by the end of their step, so that the next step's forwards do not add to them; γ 0
    makes no forward of the starting point's at the steps."""
    distributions, apply_gradients = personal_train.completion_log_distributions, personal_train.apply_gradients
    ended = []  # one entry per step applied
    made: list[tuple[int, weakref.ref]] = []  # (the step that made it, a weak reference)

    def recorded(*args):
        log_distributions, batch = distributions(*args)
        assert [step for step, alive in made if step < len(ended) and alive() is not None] == []
        made.append((len(ended), weakref.ref(log_distributions)))
        return log_distributions, batch

    def step(*args):
        norm = apply_gradients(*args)
        ended.append(1)
        return norm

    monkeypatch.setattr(personal_train, "completion_log_distributions", recorded)
    monkeypatch.setattr(personal_train, "apply_gradients", step)
    train_version(models, POPULATION, PAIRS, PersonalDPOConfig(epochs=2, batch_size=1, lr=1e-2, kl_coef=kl_coef))
    assert len(ended) == 4 and len(made) == 2 + 4 * (2 if kl_coef else 1)  # the reference's; γ 0: one forward a step


@pytest.mark.parametrize("kl_coef", [0.0, 1.0])
@pytest.mark.parametrize("lora_r, lora_alpha", [(8, 16), (4, 16)])
def test_a_version_starts_from_a_population_adapter_of_another_shape_than_its_process(tmp_path, kl_coef, lora_r,
                                                                                      lora_alpha):
    """A population adapter of rank 4, α 8 (``personal train --population --lora-r 4``), users trained by a
    process of rank 8 (``personal serve``), or of rank 4 with another α (which scales the same weights
    differently): their versions (and the KL term's frozen copy) take the starting point's own LoRA config,
    so that they begin exactly at it (margin and KL 0 at the first step)."""
    folder = tmp_path / "adapters"
    train_version(PersonalModels(build_tiny_causal(), word_tokenizer(), folder, lora_r=4, lora_alpha=8),
                  POPULATION, PAIRS, FAST)
    models = PersonalModels(build_tiny_causal(), word_tokenizer(), folder, lora_r=lora_r, lora_alpha=lora_alpha)
    version, history = train_version(models, user_owner(1), PAIRS, PersonalDPOConfig(**{**FAST.__dict__,
                                                                                       "kl_coef": kl_coef}))
    assert version == 1 and history[0]["margin"] == 0.0 and history[0].get("kl", 0.0) == 0.0
    config = models.model.peft_config["user-1-v1"]
    assert (config.r, config.lora_alpha) == (4, 8)
    fresh = models.model.peft_config[models.new_adapter("user-2-v1", None)]  # this process's own
    assert (fresh.r, fresh.lora_alpha) == (lora_r, lora_alpha)


def test_a_published_version_keeps_no_gradients_in_memory(models):
    """Its last step's gradients would double the memory of every adapter trained by this process (the
    memory report counts the weights once)."""
    train_version(models, POPULATION, PAIRS, FAST)
    train_version(models, user_owner(1), PAIRS, PersonalDPOConfig(**{**FAST.__dict__, "kl_coef": 1.0}))
    assert [n for n, p in models.model.named_parameters() if p.grad is not None] == []


def test_an_encoder_decoder_policy_trains_with_the_kl_term_from_its_population_adapter(tmp_path):
    models = PersonalModels(build_tiny_seq2seq(), word_tokenizer(), tmp_path / "adapters")
    kl = PersonalDPOConfig(**{**FAST.__dict__, "kl_coef": 1.0})
    train_version(models, POPULATION, PAIRS, kl)
    version, history = train_version(models, user_owner(1), PAIRS, kl)
    assert version == 1 and history[0]["kl"] == 0.0 and history[-1]["kl"] > 0
    assert kl_to(models, "user-1-v1", "population-v1") > 0 and "user-1-v1-start" not in models.adapter_names()
