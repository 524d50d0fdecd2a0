select
    customer,
    count(*)                  as orders,
    round(sum(total), 2)      as revenue,
    max(ordered_at)           as last_order_at
from enriched_orders
group by customer
order by revenue desc
