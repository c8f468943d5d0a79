//! DIMSE command sets (PS3.7 section 9.3 and Annex E): decode requests and responses, encode
//! responses (acceptor side) and requests (requestor side, used by `forward::upstream`).
//!
//! A command set is always implicit VR little endian (PS3.7 section 6.3.1) and small, so it is
//! parsed directly: every element length is checked against the bytes left.

use crate::uid;

pub const C_STORE_RQ: u16 = 0x0001;
pub const C_ECHO_RQ: u16 = 0x0030;
/// Bit 15 of Command Field marks a response (PS3.7 section E.1: C-STORE-RSP is 0x8001).
pub const RESPONSE_BIT: u16 = 0x8000;
/// Command Data Set Type (0000,0800) value meaning "no data set" (PS3.7 section E.1).
pub const NO_DATASET: u16 = 0x0101;

/// DIMSE status codes the gateway answers with (PS3.4 Annex B.2.3, PS3.7 Annex C).
pub mod status {
    pub const SUCCESS: u16 = 0x0000;
    pub const UNRECOGNIZED_OPERATION: u16 = 0x0211;
    pub const OUT_OF_RESOURCES: u16 = 0xA700;
    pub const DATASET_DOES_NOT_MATCH_SOP_CLASS: u16 = 0xA900;
    pub const CANNOT_UNDERSTAND: u16 = 0xC000;
}

/// The fields of a command set the gateway uses.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Command {
    pub command_field: u16,
    pub message_id: u16,
    pub affected_sop_class_uid: String,
    pub affected_sop_instance_uid: String,
    pub priority: u16,
    pub has_dataset: bool,
    /// Responses only: Message ID Being Responded To (0000,0120).
    pub message_id_being_responded_to: u16,
    /// Responses only: Status (0000,0900); `None` when absent or not 2 bytes.
    pub status: Option<u16>,
    /// Responses only: Error Comment (0000,0902), trailing padding removed.
    pub error_comment: Option<String>,
}

/// Parses a command set; the error says what is wrong with it.
pub fn decode(bytes: &[u8]) -> Result<Command, String> {
    let mut cmd = Command::default();
    let mut saw_field = false;
    let mut saw_dataset_type = false;
    let mut rest = bytes;
    while !rest.is_empty() {
        if rest.len() < 8 {
            return Err(format!(
                "command set ends inside an element header ({} bytes left)",
                rest.len()
            ));
        }
        let group = u16::from_le_bytes([rest[0], rest[1]]);
        let element = u16::from_le_bytes([rest[2], rest[3]]);
        let len = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]) as usize;
        let Some(value) = rest.get(8..8 + len) else {
            return Err(format!(
                "element (0000,{element:04X}) of {len} bytes overruns the command set"
            ));
        };
        if group != 0x0000 {
            return Err(format!(
                "element ({group:04X},{element:04X}) outside group 0000 in a command set"
            ));
        }
        let us = || (value.len() == 2).then(|| u16::from_le_bytes([value[0], value[1]]));
        let ui = || String::from_utf8_lossy(value).into_owned();
        match element {
            0x0002 => cmd.affected_sop_class_uid = ui(),
            0x0100 => {
                cmd.command_field = us().ok_or("Command Field (0000,0100) is not 2 bytes")?;
                saw_field = true;
            }
            0x0110 => cmd.message_id = us().ok_or("Message ID (0000,0110) is not 2 bytes")?,
            // Lenient like Priority: requests never carry these; a requestor checks them.
            0x0120 => cmd.message_id_being_responded_to = us().unwrap_or(0),
            0x0700 => cmd.priority = us().unwrap_or(0),
            0x0800 => {
                cmd.has_dataset =
                    us().ok_or("Command Data Set Type (0000,0800) is not 2 bytes")? != NO_DATASET;
                saw_dataset_type = true;
            }
            0x0900 => cmd.status = us(),
            0x0902 => cmd.error_comment = Some(ui().trim_end_matches(['\0', ' ']).to_owned()),
            0x1000 => cmd.affected_sop_instance_uid = ui(),
            _ => {}
        }
        rest = &rest[8 + len..];
    }
    if !saw_field || !saw_dataset_type {
        return Err(
            "command set lacks Command Field (0000,0100) or Command Data Set Type (0000,0800)"
                .into(),
        );
    }
    Ok(cmd)
}

/// Encodes a response command set (no data set follows).
pub fn response(request: &Command, status: u16, error_comment: Option<&str>) -> Vec<u8> {
    let mut body = Vec::with_capacity(160);
    if !request.affected_sop_class_uid.is_empty() {
        put(&mut body, 0x0002, &pad_uid(&request.affected_sop_class_uid));
    }
    put(
        &mut body,
        0x0100,
        &(request.command_field | 0x8000).to_le_bytes(),
    );
    put(&mut body, 0x0120, &request.message_id.to_le_bytes());
    put(&mut body, 0x0800, &NO_DATASET.to_le_bytes());
    put(&mut body, 0x0900, &status.to_le_bytes());
    if let Some(c) = error_comment {
        // Error Comment is LO: at most 64 characters (PS3.7 section C.4.2).
        let mut v: Vec<u8> = c
            .bytes()
            .filter(|b| (0x20..0x7f).contains(b) && *b != b'\\')
            .take(64)
            .collect();
        if v.len() % 2 == 1 {
            v.push(b' ');
        }
        put(&mut body, 0x0902, &v);
    }
    if !request.affected_sop_instance_uid.is_empty() {
        put(
            &mut body,
            0x1000,
            &pad_uid(&request.affected_sop_instance_uid),
        );
    }
    let mut out = Vec::with_capacity(body.len() + 12);
    put(
        &mut out,
        0x0000,
        &u32::try_from(body.len()).unwrap_or(u32::MAX).to_le_bytes(),
    );
    out.extend_from_slice(&body);
    out
}

/// Encodes a request command set: C-ECHO-RQ or C-STORE-RQ (PS3.7 sections 9.3.1.1, 9.3.5.1).
/// Priority is sent for C-STORE-RQ only; Command Data Set Type is 0000 ("present") or 0101.
pub fn request(cmd: &Command) -> Vec<u8> {
    let mut body = Vec::with_capacity(200);
    put(&mut body, 0x0002, &pad_uid(&cmd.affected_sop_class_uid));
    put(&mut body, 0x0100, &cmd.command_field.to_le_bytes());
    put(&mut body, 0x0110, &cmd.message_id.to_le_bytes());
    if cmd.command_field == C_STORE_RQ {
        put(&mut body, 0x0700, &cmd.priority.to_le_bytes());
    }
    let dataset_type = if cmd.has_dataset { 0 } else { NO_DATASET };
    put(&mut body, 0x0800, &dataset_type.to_le_bytes());
    if !cmd.affected_sop_instance_uid.is_empty() {
        put(&mut body, 0x1000, &pad_uid(&cmd.affected_sop_instance_uid));
    }
    let mut out = Vec::with_capacity(body.len() + 12);
    put(
        &mut out,
        0x0000,
        &u32::try_from(body.len()).unwrap_or(u32::MAX).to_le_bytes(),
    );
    out.extend_from_slice(&body);
    out
}

fn pad_uid(s: &str) -> Vec<u8> {
    let s = uid::validate(s).unwrap_or(s);
    let mut v = s.as_bytes().to_vec();
    if v.len() % 2 == 1 {
        v.push(0);
    }
    v
}

fn put(out: &mut Vec<u8>, element: u16, value: &[u8]) {
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&element.to_le_bytes());
    out.extend_from_slice(&u32::try_from(value.len()).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(value);
}

/// The standard's name of a status, for logs: C-STORE meanings first (PS3.4 Table B.2-1), then
/// the general codes of PS3.7 Annex C; any other code is named by its class (PS3.7 C.1).
pub fn status_name(s: u16) -> &'static str {
    match s {
        0x0000 => "Success",
        0xB000 => "Warning: Coercion of Data Elements",
        0xB006 => "Warning: Elements Discarded",
        0xB007 => "Warning: Data Set Does Not Match SOP Class",
        0xA700..=0xA7FF => "Refused: Out of Resources",
        0xA900..=0xA9FF => "Error: Data Set Does Not Match SOP Class",
        0xC000..=0xCFFF => "Error: Cannot Understand",
        0x0001 => "Warning: Requested Optional Attributes Are Not Supported",
        0x0107 => "Warning: Attribute List Error",
        0x0116 => "Warning: Attribute Value Out of Range",
        0x0105 => "Failure: No Such Attribute",
        0x0106 => "Failure: Invalid Attribute Value",
        0x0110 => "Failure: Processing Failure",
        0x0111 => "Failure: Duplicate SOP Instance",
        0x0112 => "Failure: No Such SOP Instance",
        0x0113 => "Failure: No Such Event Type",
        0x0114 => "Failure: No Such Argument",
        0x0115 => "Failure: Invalid Argument Value",
        0x0117 => "Failure: Invalid Object Instance",
        0x0118 => "Failure: No Such SOP Class",
        0x0119 => "Failure: Class-Instance Conflict",
        0x0120 => "Failure: Missing Attribute",
        0x0121 => "Failure: Missing Attribute Value",
        0x0122 => "Refused: SOP Class Not Supported",
        0x0123 => "Failure: No Such Action",
        0x0124 => "Refused: Not Authorized",
        0x0210 => "Failure: Duplicate Invocation",
        0x0211 => "Unrecognized Operation",
        0x0212 => "Failure: Mistyped Argument",
        0x0213 => "Failure: Resource Limitation",
        0xFE00 => "Cancel",
        0xFF00 | 0xFF01 => "Pending",
        0xB001..=0xBFFF => "Warning",
        _ => "Failure",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store_rq() -> Command {
        Command {
            command_field: C_STORE_RQ,
            message_id: 7,
            affected_sop_class_uid: "1.2.840.10008.5.1.4.1.1.2".into(),
            affected_sop_instance_uid: "1.2.3.4.5".into(),
            priority: 0,
            has_dataset: true,
            ..Command::default()
        }
    }

    #[test]
    fn response_decodes_back() {
        let rsp = response(&store_rq(), status::OUT_OF_RESOURCES, Some("disk full"));
        let back = decode(&rsp).unwrap();
        assert_eq!(back.command_field, 0x8001);
        assert!(!back.has_dataset);
        assert_eq!(
            back.affected_sop_instance_uid.trim_end_matches('\0'),
            "1.2.3.4.5"
        );
        // Group length covers exactly the rest.
        let gl = u32::from_le_bytes([rsp[8], rsp[9], rsp[10], rsp[11]]) as usize;
        assert_eq!(gl, rsp.len() - 12);
    }

    #[test]
    fn malformed_command_sets_are_errors() {
        assert!(decode(&[0, 0, 0, 1]).is_err());
        let mut overrun = vec![0, 0, 0x00, 0x01, 0xff, 0xff, 0, 0];
        overrun.extend_from_slice(&[1, 0]);
        assert!(decode(&overrun).is_err());
        assert!(decode(&[]).is_err());
        let mut other_group = vec![8, 0, 0x18, 0, 2, 0, 0, 0, b'1', 0];
        other_group.extend_from_slice(&response(&store_rq(), 0, None));
        assert!(decode(&other_group).is_err());
    }
}
