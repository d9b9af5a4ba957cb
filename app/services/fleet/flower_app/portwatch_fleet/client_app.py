"""The portwatch ClientApp, run by each host's SuperNode against that host's own store.

train:    fleet weights in; weights trained on this host's windows no detector flagged, and their count, out.
evaluate: the round's fleet weights in; on the last round they become a model version with origin 'fleet'
          (scaler and threshold calibrated here, on this host's held-out pool), active only when this
          host's check passes (learning.adopt, adoption.py); only counts, rates and codes go out.
Nothing else leaves the host: no rows, addresses, ports or names.
"""
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from app.services.fleet import learning

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    weights = msg.content["arrays"].to_numpy_ndarrays()
    shape = learning.shape_from(msg.content["config"])
    trained, n_windows = learning.local_update(context.node_config, weights, shape)
    content = RecordDict({"arrays": ArrayRecord(trained), "metrics": MetricRecord({"num-windows": n_windows})})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    weights = msg.content["arrays"].to_numpy_ndarrays()
    rounds = int(msg.content["config"]["rounds"])
    server_round = int(msg.content["config"]["server-round"])
    shape = learning.shape_from(msg.content["config"])
    metrics = learning.adopt(context.node_config, weights, shape, final=server_round >= rounds)
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
