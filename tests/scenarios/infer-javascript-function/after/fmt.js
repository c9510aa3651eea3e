function wrap(text) {
  return `{${text ?? ""}}`;
}

function shout(text) {
  return text.toUpperCase();
}
