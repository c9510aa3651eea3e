function total(items) {
  let sum = 0;
  for (const item of items) {
    sum += item.price;
  }
  return sum;
}

function count(items) {
  return items.length;
}

module.exports = { total, count };
