"""The portwatch ServerApp: a robust aggregate of the hosts' CNN-LSTM autoencoder weights.

Runs on the coordinator (SuperLink side). The initial network is built from the run config's shape;
each round the hosts train from the fleet weights on their own normal windows and send weights and a
window count back; the strategy named by the run config's 'aggregation' (aggregation.py: trimmed
mean by default, window counts capped at the round's median) combines them, and the aggregate goes
out again in the evaluate phase, where each host checks it and adopts it or not.
"""
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from app.services.fleet import aggregation, learning

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    rounds, fraction, min_hosts = int(rc["num-server-rounds"]), float(rc["fraction"]), int(rc["min-hosts"])
    per_host: list[dict] = []                  # the last round's evaluate replies: counts and rates, no names
    contributions = aggregation.Contributions()

    def evaluate_metrics(records, key):
        per_host[:] = [dict(next(iter(r.metric_records.values()))) for r in records]
        return aggregate_metricrecords(records, key)

    strategy = aggregation.strategy(str(rc["aggregation"]), float(rc["trim-fraction"]), contributions,
                                    fraction_train=fraction, fraction_evaluate=1.0, min_train_nodes=min_hosts,
                                    min_evaluate_nodes=min_hosts, min_available_nodes=min_hosts,
                                    evaluate_metrics_aggr_fn=evaluate_metrics)
    aggregate_evaluate = strategy.aggregate_evaluate

    def recording_evaluate(server_round, replies):
        replies = list(replies)
        contributions.evaluated(replies)
        return aggregate_evaluate(server_round, replies)
    strategy.aggregate_evaluate = recording_evaluate
    shape = learning.shape_from(rc)
    initial = ArrayRecord(learning.initial_weights(shape))
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds, timeout=float(rc["round-timeout"]),
                            train_config=ConfigRecord({"rounds": rounds, **shape}),
                            evaluate_config=ConfigRecord({"rounds": rounds, **shape}))
    learning.record_federation(str(rc["state-dir"]), result, rounds, hosts=len(list(grid.get_node_ids())),
                               per_host=per_host, contributions=contributions.hosts,
                               aggregation=str(rc["aggregation"]))
