-- portable SQL: it runs in the store (DuckDB or PostgreSQL), so it avoids
-- round(double, digits), which PostgreSQL only has for numeric
select
    customer,
    count(*)                        as orders,
    round(sum(total) * 100) / 100   as revenue,
    max(ordered_at)                 as last_order_at
from enriched_orders
group by customer
order by revenue desc
