//! YAML parsed into a tree that remembers where every node came from, so
//! every validation error can name its line and column.

use std::collections::HashMap;

use yaml_rust2::{
    parser::{Event, MarkedEventReceiver, Parser},
    scanner::{Marker, TScalarStyle},
};

/// 1-based line and column.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pos {
    pub line: usize,
    pub col: usize,
}

impl From<Marker> for Pos {
    fn from(m: Marker) -> Self {
        Self { line: m.line(), col: m.col() + 1 }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Kind {
    Map(Vec<(String, Pos, Node)>),
    Seq(Vec<Node>),
    /// The text and whether it was quoted (quoted text is always a string).
    Scalar(String, bool),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub kind: Kind,
    pub pos: Pos,
}

impl Node {
    pub fn type_name(&self) -> &'static str {
        match &self.kind {
            Kind::Map(_) => "a mapping",
            Kind::Seq(_) => "a list",
            Kind::Scalar(s, false) if is_null(s) => "null",
            Kind::Scalar(..) => "a scalar",
        }
    }
}

pub fn is_null(s: &str) -> bool {
    matches!(s, "" | "~" | "null" | "Null" | "NULL")
}

/// A syntax error with its position.
#[derive(Debug)]
pub struct SyntaxError {
    pub pos: Pos,
    pub message: String,
}

enum Frame {
    Map { pos: Pos, anchor: usize, entries: Vec<(String, Pos, Node)>, key: Option<(String, Pos)> },
    Seq { pos: Pos, anchor: usize, items: Vec<Node> },
}

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    root: Option<Node>,
    anchors: HashMap<usize, Node>,
    error: Option<SyntaxError>,
}

impl Builder {
    fn push_node(&mut self, node: Node) {
        match self.stack.last_mut() {
            None => {
                if self.root.is_none() {
                    self.root = Some(node);
                }
            }
            Some(Frame::Seq { items, .. }) => items.push(node),
            Some(Frame::Map { entries, key, .. }) => match key.take() {
                None => match node.kind {
                    Kind::Scalar(s, _) => *key = Some((s, node.pos)),
                    _ => {
                        if self.error.is_none() {
                            self.error = Some(SyntaxError {
                                pos: node.pos,
                                message: "mapping keys must be plain scalars".into(),
                            });
                        }
                        *key = Some((String::new(), node.pos));
                    }
                },
                Some((k, kpos)) => entries.push((k, kpos, node)),
            },
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let pos = Pos::from(mark);
        match ev {
            Event::Scalar(value, style, anchor, _) => {
                let quoted = !matches!(style, TScalarStyle::Plain);
                let node = Node { kind: Kind::Scalar(value, quoted), pos };
                if anchor != 0 {
                    self.anchors.insert(anchor, node.clone());
                }
                self.push_node(node);
            }
            Event::SequenceStart(anchor, _) => self.stack.push(Frame::Seq { pos, anchor, items: Vec::new() }),
            Event::MappingStart(anchor, _) => {
                self.stack.push(Frame::Map { pos, anchor, entries: Vec::new(), key: None })
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let (node, anchor) = match self.stack.pop() {
                    Some(Frame::Seq { pos, anchor, items }) => (Node { kind: Kind::Seq(items), pos }, anchor),
                    Some(Frame::Map { pos, anchor, entries, .. }) => (Node { kind: Kind::Map(entries), pos }, anchor),
                    None => return,
                };
                if anchor != 0 {
                    self.anchors.insert(anchor, node.clone());
                }
                self.push_node(node);
            }
            Event::Alias(id) => {
                let node = self.anchors.get(&id).cloned().unwrap_or(Node { kind: Kind::Scalar(String::new(), false), pos });
                self.push_node(Node { pos, ..node });
            }
            _ => {}
        }
    }
}

/// Parses the first document of `text`; an empty document is an empty mapping.
pub fn parse(text: &str) -> Result<Node, SyntaxError> {
    let mut builder = Builder::default();
    let mut parser = Parser::new_from_str(text);
    parser
        .load(&mut builder, false)
        .map_err(|e| SyntaxError { pos: Pos::from(*e.marker()), message: e.info().to_owned() })?;
    if let Some(e) = builder.error {
        return Err(e);
    }
    Ok(builder.root.unwrap_or(Node { kind: Kind::Map(Vec::new()), pos: Pos { line: 1, col: 1 } }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based() {
        let n = parse("a:\n  b: [1, 2]\n").unwrap();
        let Kind::Map(entries) = n.kind else { panic!() };
        assert_eq!(entries[0].1, Pos { line: 1, col: 1 });
        let Kind::Map(inner) = &entries[0].2.kind else { panic!() };
        assert_eq!(inner[0].1, Pos { line: 2, col: 3 });
        let Kind::Seq(items) = &inner[0].2.kind else { panic!() };
        assert_eq!(items[1].pos, Pos { line: 2, col: 10 });
    }

    #[test]
    fn syntax_errors_have_positions() {
        let e = parse("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(e.pos.line >= 1, "{e:?}");
    }
}
