function wrap(text) {
  if (!text) {
    return "{}";
  }
  return "{" + text + "}";
}

function shout(text) {
  return text.toUpperCase();
}
