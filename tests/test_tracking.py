"""Metric sinks (perception_r1/tracking.py): the fan-out calls every sink through explicit methods and
survives a failing one (counted); a new experiment in a sqlite store keeps its artifacts beside the
database, not in the working directory."""


from perception_r1.tracking import ConsoleSink, FanOut, use_experiment


class Recording:
    def __init__(self):
        self.calls = []

    def log_metrics(self, step, metrics):
        self.calls.append(("metrics", step))

    def log_dict(self, data, *, artifact_file):
        self.calls.append(("dict", artifact_file))

    def log_table(self, table, *, artifact_file):
        self.calls.append(("table", artifact_file))

    def log_checkpoint(self, path, *, version):
        self.calls.append(("checkpoint", version))

    def close(self, *, status):
        self.calls.append(("close", status))


class Broken(Recording):
    def log_metrics(self, step, metrics):
        raise OSError("disk full")


def test_fan_out_reaches_every_sink_and_survives_a_broken_one(caplog):
    good, broken, lines = Recording(), Broken(), []
    fan = FanOut([broken, good, ConsoleSink(write=lines.append)])
    fan.log_metrics(3, {"reward/total": 0.5})
    fan.log_dict({"1": 2}, artifact_file="h.json")
    fan.log_table({"a": [1]}, artifact_file="t.json")
    fan.log_checkpoint("/c", version=4)
    fan.close(status="FINISHED")
    assert good.calls == [("metrics", 3), ("dict", "h.json"), ("table", "t.json"), ("checkpoint", 4),
                          ("close", "FINISHED")]
    assert fan.failures == 1 and "Broken.log_metrics failed" in caplog.text and "disk full" in caplog.text
    assert lines == ["step 3: total=0.5"]


def test_a_new_sqlite_experiment_keeps_its_artifacts_beside_the_database(tmp_path, monkeypatch):
    import mlflow

    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    store = tmp_path / "store"
    store.mkdir()
    use_experiment(f"sqlite:///{store / 'mlflow.db'}", "beside-the-db")
    with mlflow.start_run():
        mlflow.log_dict({"a": 1}, "a.json")
    assert list(store.glob("mlruns/*/artifacts/a.json")) and not list(elsewhere.iterdir())
    use_experiment(f"sqlite:///{store / 'mlflow.db'}", "beside-the-db")  # exists: reused, not created again
    assert mlflow.get_experiment_by_name("beside-the-db").artifact_location == (store / "mlruns").as_uri()


def test_ray_gauges_of_a_key_absent_from_this_step_read_zero():
    """A staleness bin set at one step and empty at the next must not keep its old count."""
    from perception_r1.tracking import RayMetricsSink

    values: dict[tuple[str, str], float] = {}

    class Gauge:
        def __init__(self, name, *, description, tag_keys):
            self.name, self.description = name, description

        def set(self, value, *, tags):
            values[(self.name, tags["actor"])] = value

    sink = RayMetricsSink(run_name="r")
    sink.Gauge = Gauge
    sink.log_metrics(0, {"staleness/groups_at_1": 3.0, "gen/actor0/tokens_per_s": 9.0, "learner/loss": 0.5})
    sink.log_metrics(1, {"staleness/groups_at_0": 4.0, "learner/loss": 0.25})
    assert values == {("perception_r1_staleness_groups_at_1", "all"): 0.0,
                      ("perception_r1_staleness_groups_at_0", "all"): 4.0,
                      ("perception_r1_gen_tokens_per_s", "0"): 0.0, ("perception_r1_learner_loss", "all"): 0.25}
    assert sink.gauges["gen_tokens_per_s"].description == "gen/actor<id>/tokens_per_s"
    # a validation's row (val/* only) and the steps' rows leave each other's gauges alone
    sink.log_metrics(2, {"val/accuracy": 0.5})
    sink.log_metrics(2, {"learner/loss": 0.125})
    assert values[("perception_r1_val_accuracy", "all")] == 0.5
    assert values[("perception_r1_staleness_groups_at_0", "all")] == 0.0  # still zeroed by the step's row
    sink.log_metrics(3, {"val/reward": 1.0})
    assert values[("perception_r1_val_accuracy", "all")] == 0.0 and values[("perception_r1_learner_loss", "all")] == 0.125
