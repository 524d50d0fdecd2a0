select region, count(*) as orders, sum(amount) as revenue
from sales
group by region
order by region
