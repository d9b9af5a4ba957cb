"""The portwatch ServerApp: FedAvg over the hosts' CNN-LSTM autoencoder weights, weighted by windows.

Runs on the coordinator (SuperLink side). The initial network is built from the run config's shape;
each round the hosts train from the fleet weights on their own normal windows and send weights and a
window count back; the aggregate goes out again in the evaluate phase, where each host adopts it.
"""
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from app.services.fleet import learning

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    rounds, fraction, min_hosts = int(rc["num-server-rounds"]), float(rc["fraction"]), int(rc["min-hosts"])
    per_host: list[dict] = []                  # the last round's evaluate replies: counts and rates, no names

    def evaluate_metrics(records, key):
        per_host[:] = [dict(next(iter(r.metric_records.values()))) for r in records]
        return aggregate_metricrecords(records, key)

    strategy = FedAvg(fraction_train=fraction, fraction_evaluate=1.0, min_train_nodes=min_hosts,
                      min_evaluate_nodes=min_hosts, min_available_nodes=min_hosts, weighted_by_key="num-windows",
                      evaluate_metrics_aggr_fn=evaluate_metrics)
    shape = learning.shape_from(rc)
    initial = ArrayRecord(learning.initial_weights(shape))
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds, timeout=float(rc["round-timeout"]),
                            train_config=ConfigRecord({"rounds": rounds, **shape}),
                            evaluate_config=ConfigRecord({"rounds": rounds, **shape}))
    learning.record_federation(str(rc["state-dir"]), result, rounds, hosts=len(list(grid.get_node_ids())),
                               per_host=per_host)
