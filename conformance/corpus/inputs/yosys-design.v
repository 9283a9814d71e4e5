module alu #(parameter W = 16) (input [W-1:0] a, b, input [2:0] op, output reg [W-1:0] y, output zero);
  always @* case (op)
    3'd0: y = a + b;
    3'd1: y = a - b;
    3'd2: y = a & b;
    3'd3: y = a | b;
    3'd4: y = a ^ b;
    3'd5: y = a << b[3:0];
    3'd6: y = a * b;
    default: y = (a < b) ? 1 : 0;
  endcase
  assign zero = (y == 0);
endmodule

module top (input clk, input rst, input [15:0] din, input [2:0] op, output reg [15:0] acc, output reg [1:0] state, output zero);
  wire [15:0] y;
  alu #(16) u (.a(acc), .b(din), .op(op), .y(y), .zero(zero));
  reg [7:0] count;
  always @(posedge clk) begin
    if (rst) begin acc <= 0; state <= 0; count <= 0; end
    else begin
      count <= count + 1;
      case (state)
        2'd0: if (din[0]) state <= 2'd1;
        2'd1: begin acc <= y; state <= zero ? 2'd3 : 2'd2; end
        2'd2: if (count[3]) state <= 2'd0;
        2'd3: state <= 2'd0;
      endcase
    end
  end
endmodule
