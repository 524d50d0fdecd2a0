"""Enrich only the orders not seen before: a stream keeps its position across runs."""

from patterns import Parameter, State, Table

from pricing import band  # a helper module from the app folder

orders = Table("orders")
enriched = Table("enriched_orders", "w")
state = State()
vat_rate = Parameter("vat_rate", type=float, default=0.2)

seen = state.get_value("orders_seen", 0)
new = 0
for order in orders.as_stream(order_by="ordered_at").consume_records():
    order["vat"] = round(order["amount"] * vat_rate, 2)
    order["total"] = round(order["amount"] + order["vat"], 2)
    order["band"] = band(order["total"])
    enriched.append(order)
    new += 1
    if not state.should_continue():
        state.request_new_run()  # near the time limit: continue in a fresh run
        break

state.set_value("orders_seen", seen + new)
print(f"enriched {new} new orders ({seen + new} in total)")
