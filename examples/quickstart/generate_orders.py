"""Produce a batch of new orders on every run (a stand-in for an API source)."""

import random
from datetime import datetime, timedelta, timezone

from patterns import Parameter, State, Table

orders = Table("orders", "w")
state = State()
batch_size = Parameter("batch_size", type=int, default=100)

next_id = state.get_value("next_order_id", 1)
rng = random.Random(next_id)  # deterministic per batch, so reruns are reproducible
customers = ["ada", "grace", "linus", "guido", "barbara"]
start = datetime(2026, 1, 1, tzinfo=timezone.utc) + timedelta(hours=next_id)

orders.append(
    [
        {
            "order_id": next_id + i,
            "customer": rng.choice(customers),
            "amount": round(rng.uniform(5, 500), 2),
            "ordered_at": start + timedelta(minutes=i),
        }
        for i in range(batch_size)
    ]
)
state.set_value("next_order_id", next_id + batch_size)
print(f"generated orders {next_id}..{next_id + batch_size - 1}")
