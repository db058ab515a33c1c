//! YAML parsed into a tree that remembers where every node came from, so
//! every validation error can name its line and column.

use std::collections::HashMap;

use yaml_rust2::{
    parser::{Event, Parser},
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

/// Mappings and lists nested deeper than this are refused. The policy
/// language needs six levels; the bound keeps every recursive walk over
/// the tree (building, dropping, cloning) far from the stack's end.
pub const MAX_DEPTH: usize = 64;
/// Nodes in the tree, counting each copy an alias makes and the copy
/// kept of each anchored node: a few hundred bytes of nested aliases
/// would otherwise expand to billions.
pub const MAX_NODES: usize = 1_000_000;

/// A complete node, with what it costs.
struct Built {
    node: Node,
    /// Nodes in it, itself included.
    size: usize,
    /// Levels of nesting in it: 0 for a scalar.
    height: usize,
}

enum Frame {
    Map { pos: Pos, anchor: usize, entries: Vec<(String, Pos, Node)>, key: Option<(String, Pos)>, size: usize, height: usize },
    Seq { pos: Pos, anchor: usize, items: Vec<Node>, size: usize, height: usize },
}

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    root: Option<Node>,
    anchors: HashMap<usize, Built>,
    /// Nodes made so far.
    nodes: usize,
}

impl Builder {
    fn spend(&mut self, nodes: usize, pos: Pos, what: &str) -> Result<(), SyntaxError> {
        self.nodes = self.nodes.saturating_add(nodes);
        if self.nodes > MAX_NODES {
            return Err(SyntaxError { pos, message: format!("{what} makes the document larger than {MAX_NODES} nodes; this reader refuses it") });
        }
        Ok(())
    }

    fn push_node(&mut self, built: Built) -> Result<(), SyntaxError> {
        let Built { node, size, height } = built;
        match self.stack.last_mut() {
            None => {
                if self.root.is_none() {
                    self.root = Some(node);
                }
            }
            Some(Frame::Seq { items, size: s, height: h, .. }) => {
                items.push(node);
                *s += size;
                *h = (*h).max(height + 1);
            }
            Some(Frame::Map { entries, key, size: s, height: h, .. }) => {
                *s += size;
                *h = (*h).max(height + 1);
                match key.take() {
                    None => match node.kind {
                        Kind::Scalar(k, _) => *key = Some((k, node.pos)),
                        _ => return Err(SyntaxError { pos: node.pos, message: "mapping keys must be plain scalars".into() }),
                    },
                    Some((k, kpos)) => entries.push((k, kpos, node)),
                }
            }
        }
        Ok(())
    }

    fn open(&mut self, frame: Frame, pos: Pos) -> Result<(), SyntaxError> {
        if self.stack.len() >= MAX_DEPTH {
            return Err(SyntaxError { pos, message: format!("nested deeper than {MAX_DEPTH} levels; this reader refuses it") });
        }
        self.spend(1, pos, "this node")?;
        self.stack.push(frame);
        Ok(())
    }

    /// Keeps a copy of an anchored node for its aliases.
    fn anchor(&mut self, anchor: usize, built: &Built) -> Result<(), SyntaxError> {
        if anchor != 0 {
            self.spend(built.size, built.node.pos, "the copy kept of this anchored node")?;
            self.anchors.insert(anchor, Built { node: built.node.clone(), size: built.size, height: built.height });
        }
        Ok(())
    }

    fn on_event(&mut self, ev: Event, mark: Marker) -> Result<(), SyntaxError> {
        let pos = Pos::from(mark);
        match ev {
            Event::Scalar(value, style, anchor, _) => {
                self.spend(1, pos, "this node")?;
                let quoted = !matches!(style, TScalarStyle::Plain);
                let built = Built { node: Node { kind: Kind::Scalar(value, quoted), pos }, size: 1, height: 0 };
                self.anchor(anchor, &built)?;
                self.push_node(built)
            }
            Event::SequenceStart(anchor, _) => self.open(Frame::Seq { pos, anchor, items: Vec::new(), size: 1, height: 0 }, pos),
            Event::MappingStart(anchor, _) => {
                self.open(Frame::Map { pos, anchor, entries: Vec::new(), key: None, size: 1, height: 0 }, pos)
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let (built, anchor) = match self.stack.pop() {
                    Some(Frame::Seq { pos, anchor, items, size, height }) => (Built { node: Node { kind: Kind::Seq(items), pos }, size, height }, anchor),
                    Some(Frame::Map { pos, anchor, entries, size, height, .. }) => {
                        (Built { node: Node { kind: Kind::Map(entries), pos }, size, height }, anchor)
                    }
                    None => return Ok(()),
                };
                self.anchor(anchor, &built)?;
                self.push_node(built)
            }
            Event::Alias(id) => {
                let Some((size, height)) = self.anchors.get(&id).map(|t| (t.size, t.height)) else {
                    return Err(SyntaxError { pos, message: "this alias refers to a node that encloses it".into() });
                };
                if self.stack.len() + height > MAX_DEPTH {
                    return Err(SyntaxError { pos, message: format!("this alias nests the document deeper than {MAX_DEPTH} levels; this reader refuses it") });
                }
                // Counted before the copy is made.
                self.spend(size, pos, "this alias")?;
                let node = Node { pos, ..self.anchors[&id].node.clone() };
                self.push_node(Built { node, size, height })
            }
            _ => Ok(()),
        }
    }
}

/// Parses the first document of `text`; an empty document is an empty mapping.
pub fn parse(text: &str) -> Result<Node, SyntaxError> {
    let mut builder = Builder::default();
    let mut parser = Parser::new_from_str(text);
    // Events one at a time: `Parser::load` recurses once per level of
    // nesting, and would overflow the stack before any bound of ours.
    loop {
        let (ev, mark) = parser.next_token().map_err(|e| SyntaxError { pos: Pos::from(*e.marker()), message: e.info().to_owned() })?;
        if matches!(ev, Event::DocumentEnd | Event::StreamEnd) {
            break;
        }
        builder.on_event(ev, mark)?;
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

    #[test]
    fn aliases_copy_their_anchor() {
        let n = parse("a: &x [1, 2]\nb: *x\n").unwrap();
        let Kind::Map(entries) = n.kind else { panic!() };
        assert_eq!(entries[1].2.pos, Pos { line: 2, col: 4 });
        assert!(matches!(&entries[1].2.kind, Kind::Seq(items) if items.len() == 2));
    }

    /// A billion laughs in 300 bytes: refused at the alias that crosses
    /// the bound, after at most MAX_NODES nodes were made.
    #[test]
    fn an_alias_bomb_is_refused_at_the_alias() {
        let mut text = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
        for (i, name) in ["b", "c", "d", "e", "f", "g", "h", "i"].iter().enumerate() {
            let prev = ["a", "b", "c", "d", "e", "f", "g", "h"][i];
            text += &format!("{name}: &{name} [{}]\n", vec![format!("*{prev}"); 10].join(", "));
        }
        let start = std::time::Instant::now();
        let e = parse(&text).unwrap_err();
        assert!(e.message.contains("this alias makes the document larger than 1000000 nodes"), "{e:?}");
        // Line 6 (f: 10 copies of e, 111,111 nodes each) crosses the bound
        // at its 7th alias, at column 32: 246,919 nodes before it.
        assert_eq!(e.pos, Pos { line: 6, col: 32 }, "{e:?}");
        assert!(start.elapsed() < std::time::Duration::from_secs(10), "{:?}", start.elapsed());
    }

    #[test]
    fn an_alias_inside_its_own_anchor_is_an_error() {
        let e = parse("a: &a [1, *a]\n").unwrap_err();
        assert_eq!((e.pos, e.message.contains("encloses it")), (Pos { line: 1, col: 11 }, true), "{e:?}");
    }

    #[test]
    fn deep_nesting_is_refused_without_overflowing_the_stack() {
        // Block lists: `- - - ... a`, one level per two bytes, 400,000 levels.
        let block = format!("x:\n{}a\n", "- ".repeat(400_000));
        let e = parse(&block).unwrap_err();
        // The root mapping and 63 lists are allowed: the 64th list starts
        // at column 1 + 2 * 63.
        assert_eq!(e.pos, Pos { line: 2, col: 127 }, "{e:?}");
        assert!(e.message.contains("nested deeper than 64 levels"), "{e:?}");
        // Block mappings, one level per line: the 65th opens on line 65
        // (yaml-rust2 marks a block mapping one column after its first key).
        let maps: String = (0..5000).map(|i| format!("{}k:\n", " ".repeat(i))).collect();
        let e = parse(&maps).unwrap_err();
        assert_eq!(e.pos, Pos { line: 65, col: 66 }, "{e:?}");
        assert!(e.message.contains("nested deeper"), "{e:?}");
        // Flow lists: the root mapping is the first level, so the 64th `[`
        // opens the 65th.
        let flow = format!("x: {}\n", "[".repeat(100));
        let e = parse(&flow).unwrap_err();
        assert_eq!(e.pos, Pos { line: 1, col: 4 + 63 }, "{e:?}");
        // 1 MB of `[`: yaml-rust2's scanner looks ahead for a key and stops
        // itself at 256 flow levels, before the parser sees the first.
        let flow = format!("x: {}\n", "[".repeat(1 << 20));
        let e = parse(&flow).unwrap_err();
        assert_eq!((e.pos, e.message.as_str()), (Pos { line: 1, col: 4 + 255 }, "recursion limit exceeded"), "{e:?}");
        // Aliases cannot nest past the bound either.
        let mut text = String::from("a: &a ");
        text += &"[".repeat(40);
        text += &"]".repeat(40);
        text += "\nb: [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[*a]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]\n";
        let e = parse(&text).unwrap_err();
        assert_eq!(e.pos, Pos { line: 2, col: 4 + 30 }, "{e:?}");
        assert!(e.message.contains("alias nests"), "{e:?}");
    }
}
