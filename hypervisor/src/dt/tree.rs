//! Navigation of a checked structure block: the root, children, properties, lookup by path,
//! depth-first iteration, parents.
//!
//! It owns the walk, not the validation: it is only ever built from a [`super::Checked`] blob,
//! whose grammar `check` has enforced. It still never indexes or unwraps: if the bytes ever
//! disagreed with the check, iteration would simply stop. It must never recurse on blob data
//! (the ancestor stack is a fixed array bounded by [`MAX_DEPTH`]) and never follow aliases on
//! its own (fdt 0.1.5 loops forever on a self-referencing alias; lookups here take literal paths).

use super::check::MAX_DEPTH;
use core::fmt;

use super::prop::Property;
use super::token::{Blocks, Skim};

/// The node tree of a checked blob.
#[derive(Debug, Clone, Copy)]
pub struct Tree<'a> {
    blocks: Blocks<'a>,
}

impl<'a> Tree<'a> {
    pub(crate) fn new(blocks: Blocks<'a>) -> Self {
        Tree { blocks }
    }

    /// The root node (always present in a checked blob).
    pub fn root(&self) -> Option<Node<'a>> {
        self.nodes().next()
    }

    /// Every node, depth-first, in blob order (the root first).
    pub fn nodes(&self) -> Nodes<'a> {
        Nodes { blocks: self.blocks, pos: 0, depth: 0, stack: [0; MAX_DEPTH], done: false }
    }

    /// The node at an absolute path such as `/cpus/cpu@0`. A component without `@` also matches
    /// a name with a unit address (`/memory` finds `memory@40000000`); the first match wins.
    /// Aliases are not followed.
    pub fn find(&self, path: &str) -> Option<Node<'a>> {
        let rest = path.strip_prefix('/')?;
        let mut node = self.root()?;
        for part in rest.split('/').filter(|p| !p.is_empty()) {
            node = node.child(part)?;
        }
        Some(node)
    }
}

/// One node. Small and `Copy`: it records where it starts and where its ancestors start.
#[derive(Debug, Clone, Copy)]
pub struct Node<'a> {
    blocks: Blocks<'a>,
    /// Struct-block position of this node's BEGIN_NODE token.
    begin: u32,
    /// Struct-block position of the first token after the name.
    body: u32,
    name: &'a str,
    /// 0 for the root.
    depth: usize,
    /// `ancestors[..depth]`: BEGIN_NODE positions of the root, ..., the parent.
    ancestors: [u32; MAX_DEPTH],
}

/// Decodes the node whose BEGIN_NODE is at `begin`.
fn node_at<'a>(
    blocks: Blocks<'a>,
    begin: u32,
    depth: usize,
    ancestors: [u32; MAX_DEPTH],
) -> Option<Node<'a>> {
    match blocks.skim(begin as usize)? {
        (Skim::BeginNode { raw_name }, body) => {
            let name = core::str::from_utf8(raw_name).ok()?;
            Some(Node { blocks, begin, body: u32::try_from(body).ok()?, name, depth, ancestors })
        }
        _ => None,
    }
}

/// The position just past the END_NODE that closes the node beginning at `begin`.
fn skip_subtree(blocks: &Blocks<'_>, begin: usize) -> Option<usize> {
    let mut pos = begin;
    let mut open = 0usize;
    loop {
        let (token, next) = blocks.skim(pos)?;
        match token {
            Skim::BeginNode { .. } => open += 1,
            Skim::EndNode => {
                open = open.checked_sub(1)?;
                if open == 0 {
                    return Some(next);
                }
            }
            Skim::Prop { .. } | Skim::Nop => {}
            Skim::End => return None,
        }
        pos = next;
    }
}

impl<'a> Node<'a> {
    /// The full name, e.g. `memory@40000000` (empty for the root).
    pub fn name(&self) -> &'a str {
        self.name
    }

    /// The name without its unit address, e.g. `memory`.
    pub fn base_name(&self) -> &'a str {
        self.name.split('@').next().unwrap_or(self.name)
    }

    /// 0 for the root, 1 for its children, ...
    pub fn depth(&self) -> usize {
        self.depth
    }

    /// The node's path, for messages: a reference rendered on demand.
    pub fn path(&self) -> NodePath<'a> {
        NodePath { blocks: self.blocks, begin: self.begin }
    }

    /// The node's position in the struct block: its identity within one blob.
    pub fn offset(&self) -> u32 {
        self.begin
    }

    /// The names from the root's child down to this node (nothing for the root).
    pub fn components(&self) -> impl Iterator<Item = &'a str> + '_ {
        (1..self.depth)
            .filter_map(|d| self.ancestor(d).map(|n| n.name))
            .chain(core::iter::once(self.name).filter(|_| self.depth > 0))
    }

    /// The ancestor at depth `depth` (0 = root), if `depth` is above this node.
    fn ancestor(&self, depth: usize) -> Option<Node<'a>> {
        if depth >= self.depth {
            return None;
        }
        node_at(self.blocks, *self.ancestors.get(depth)?, depth, self.ancestors)
    }

    /// The parent node (`None` for the root).
    pub fn parent(&self) -> Option<Node<'a>> {
        self.ancestor(self.depth.checked_sub(1)?)
    }

    /// The node's properties, in blob order.
    pub fn properties(&self) -> Properties<'a> {
        Properties { blocks: self.blocks, pos: self.body as usize, done: false }
    }

    /// The first property called `name`.
    pub fn property(&self, name: &str) -> Option<Property<'a>> {
        // Names are compared as bytes in the strings block: no UTF-8 decoding per property.
        let mut pos = self.body as usize;
        loop {
            match self.blocks.skim(pos)? {
                (Skim::Prop { nameoff, value }, next) => {
                    if self.blocks.name_is(nameoff, name) {
                        return Some(Property { name: self.blocks.name_at(nameoff)?, value });
                    }
                    pos = next;
                }
                (Skim::Nop, next) => pos = next,
                _ => return None,
            }
        }
    }

    /// The node's direct children, in blob order.
    pub fn children(&self) -> Children<'a> {
        let mut ancestors = self.ancestors;
        let room = self.depth + 1 < MAX_DEPTH;
        if let Some(slot) = ancestors.get_mut(self.depth) {
            *slot = self.begin;
        }
        Children {
            blocks: self.blocks,
            pos: self.body as usize,
            depth: self.depth + 1,
            ancestors,
            done: !room,
        }
    }

    /// The first child called `name`; failing that, when `name` has no `@`, the first whose base
    /// name is `name` (so `memory` finds `memory@40000000`).
    pub fn child(&self, name: &str) -> Option<Node<'a>> {
        self.children().find(|c| c.name == name).or_else(|| {
            if name.contains('@') {
                None
            } else {
                self.children().find(|c| c.base_name() == name)
            }
        })
    }

    /// True when the `compatible` string list contains `compat`.
    pub fn is_compatible(&self, compat: &str) -> bool {
        self.property("compatible").is_some_and(|p| p.has_string(compat))
    }

    /// False only when `status` says the device is not usable ("disabled", "fail", ...).
    pub fn is_enabled(&self) -> bool {
        match self.property("status") {
            None => true,
            Some(p) => matches!(p.as_str(), Some("okay") | Some("ok")),
        }
    }
}

impl<'a> Node<'a> {
    /// The node whose BEGIN_NODE token at `begin` carries `raw_name`, its body starting at
    /// `body`; `None` if the name is not UTF-8 (the checker refuses such blobs) or a position
    /// does not fit 32 bits.
    fn at(
        blocks: Blocks<'a>,
        begin: usize,
        body: usize,
        raw_name: &'a [u8],
        depth: usize,
        ancestors: [u32; MAX_DEPTH],
    ) -> Option<Node<'a>> {
        Some(Node {
            blocks,
            begin: u32::try_from(begin).ok()?,
            body: u32::try_from(body).ok()?,
            name: core::str::from_utf8(raw_name).ok()?,
            depth,
            ancestors,
        })
    }
}

/// Depth-first iterator over every node; see [`Tree::nodes`].
pub struct Nodes<'a> {
    blocks: Blocks<'a>,
    pos: usize,
    depth: usize,
    stack: [u32; MAX_DEPTH],
    done: bool,
}

impl<'a> Iterator for Nodes<'a> {
    type Item = Node<'a>;

    fn next(&mut self) -> Option<Node<'a>> {
        while !self.done {
            let Some((token, next)) = self.blocks.skim(self.pos) else { break };
            match token {
                Skim::BeginNode { raw_name } => {
                    let node = Node::at(self.blocks, self.pos, next, raw_name, self.depth, self.stack)?;
                    let slot = self.stack.get_mut(self.depth)?;
                    *slot = node.begin;
                    self.depth += 1;
                    self.pos = next;
                    return Some(node);
                }
                Skim::EndNode => {
                    let Some(depth) = self.depth.checked_sub(1) else { break };
                    self.depth = depth;
                }
                Skim::Prop { .. } | Skim::Nop => {}
                Skim::End => break,
            }
            self.pos = next;
        }
        self.done = true;
        None
    }
}

/// Iterator over one node's properties; see [`Node::properties`].
pub struct Properties<'a> {
    blocks: Blocks<'a>,
    pos: usize,
    done: bool,
}

impl<'a> Iterator for Properties<'a> {
    type Item = Property<'a>;

    fn next(&mut self) -> Option<Property<'a>> {
        while !self.done {
            let Some((token, next)) = self.blocks.skim(self.pos) else { break };
            self.pos = next;
            match token {
                Skim::Prop { nameoff, value } => {
                    let Some(name) = self.blocks.name_at(nameoff) else { break };
                    return Some(Property { name, value });
                }
                Skim::Nop => {}
                _ => break,
            }
        }
        self.done = true;
        None
    }
}

/// Iterator over one node's children; see [`Node::children`].
pub struct Children<'a> {
    blocks: Blocks<'a>,
    pos: usize,
    /// Depth of the children.
    depth: usize,
    /// The children's ancestors (the parent's, plus the parent).
    ancestors: [u32; MAX_DEPTH],
    done: bool,
}

impl<'a> Iterator for Children<'a> {
    type Item = Node<'a>;

    fn next(&mut self) -> Option<Node<'a>> {
        while !self.done {
            let Some((token, next)) = self.blocks.skim(self.pos) else { break };
            match token {
                Skim::BeginNode { raw_name } => {
                    let Some(node) =
                        Node::at(self.blocks, self.pos, next, raw_name, self.depth, self.ancestors)
                    else {
                        break;
                    };
                    match skip_subtree(&self.blocks, self.pos) {
                        Some(after) => self.pos = after,
                        None => self.done = true,
                    }
                    return Some(node);
                }
                Skim::Prop { .. } | Skim::Nop => self.pos = next,
                Skim::EndNode | Skim::End => break,
            }
        }
        self.done = true;
        None
    }
}

/// A node's path, for error messages (`/cpus/cpu@1`). Small and `Copy`: it refers to the node
/// and renders its path only when displayed or compared (a walk from the root), so errors that
/// carry it stay cheap to return.
#[derive(Clone, Copy)]
pub struct NodePath<'a> {
    blocks: Blocks<'a>,
    begin: u32,
}

impl<'a> NodePath<'a> {
    /// The node this path names, found again by walking from the root.
    fn node(&self) -> Option<Node<'a>> {
        Tree::new(self.blocks).nodes().find(|n| n.begin == self.begin)
    }

    /// The node's own name ("" for the root).
    pub fn name(&self) -> &'a str {
        match self.blocks.skim(self.begin as usize) {
            Some((Skim::BeginNode { raw_name }, _)) => core::str::from_utf8(raw_name).unwrap_or(""),
            _ => "",
        }
    }
}

impl fmt::Display for NodePath<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(node) = self.node() else { return write!(f, "<node at {:#x}>", self.begin) };
        if node.depth == 0 {
            return f.write_str("/");
        }
        for part in node.components() {
            write!(f, "/{part}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for NodePath<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

impl PartialEq for NodePath<'_> {
    /// Equal when the paths read the same (two nodes may share a path).
    fn eq(&self, other: &Self) -> bool {
        match (self.node(), other.node()) {
            (Some(a), Some(b)) => a.depth == b.depth && a.components().eq(b.components()),
            _ => false,
        }
    }
}

impl Eq for NodePath<'_> {}
